//! The privacy parameters of one query.
//!
//! A query names them in BigQuery's syntax,
//! `SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, max_groups_contributed = 2) …`,
//! or inherits them from the session and the manifest's defaults. The clause is
//! cut from the SQL text before DataFusion parses the rest; values are checked
//! here so that a NaN, a non-positive ε or an ε above the per-query cap never
//! reaches a mechanism.

use crate::error::{DpError, Result};
use crate::policy::Defaults;

/// Every option a query (OPTIONS clause) or a session (`SET cleanroom.…`) can set.
pub const OPTION_NAMES: &[&str] = &[
    "epsilon",
    "delta",
    "max_groups_contributed",
    "max_contributions_per_group",
    "privacy_unit_column",
    "confidence_intervals",
    "noise",
];

/// The noise a query's columns get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NoiseKind {
    /// Laplace (pure ε-DP; discrete for counts).
    #[default]
    Laplace,
    /// Gaussian, composed in zCDP and charged as (ε, δ); needs δ > 0.
    Gaussian,
}

/// Options a query or a session asked for; `None` means "use the default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryOptions {
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub max_groups_contributed: Option<u32>,
    pub max_contributions_per_group: Option<u32>,
    /// BigQuery's `privacy_unit_column`: accepted when it names the dataset's
    /// privacy-unit column (the manifest decides what a person is).
    pub privacy_unit_column: Option<String>,
    /// Add `<column>_ci_low` / `<column>_ci_high` companion columns (the 95 %
    /// interval) next to every noisy column.
    pub confidence_intervals: Option<bool>,
    /// `noise = 'laplace' | 'gaussian'`.
    pub noise: Option<NoiseKind>,
}

/// Options after defaults were applied and ranges checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedOptions {
    pub epsilon: f64,
    /// The most δ the query may spend (it is charged only what it uses: 0
    /// for Laplace noise over public domains).
    pub delta: f64,
    pub max_groups_contributed: u32,
    pub max_contributions_per_group: u32,
    pub privacy_unit_column: Option<String>,
    pub confidence_intervals: bool,
    pub noise: NoiseKind,
}

/// Largest per-person group or row bound a query may ask for: beyond it the
/// noise would drown every answer, and it keeps sensitivities far from overflow.
const MAX_CONTRIBUTION_BOUND: u32 = 10_000;

impl QueryOptions {
    /// Set one option from its SQL spelling; used for the OPTIONS clause and for
    /// `SET cleanroom.<name> = <value>`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().trim_matches('\'').trim_matches('"');
        let number = || -> Result<f64> {
            value.parse::<f64>().map_err(|_| DpError::InvalidOption {
                option: name.clone(),
                detail: format!("`{value}` is not a number"),
            })
        };
        let count = || -> Result<u32> {
            value.parse::<u32>().map_err(|_| DpError::InvalidOption {
                option: name.clone(),
                detail: format!("`{value}` is not a positive whole number"),
            })
        };
        match name.as_str() {
            "epsilon" => self.epsilon = Some(number()?),
            "delta" => self.delta = Some(number()?),
            "max_groups_contributed" => self.max_groups_contributed = Some(count()?),
            "max_contributions_per_group" => self.max_contributions_per_group = Some(count()?),
            "privacy_unit_column" => self.privacy_unit_column = Some(value.to_string()),
            "confidence_intervals" => {
                self.confidence_intervals = Some(match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(DpError::InvalidOption {
                            option: name.clone(),
                            detail: format!("`{value}` is not true or false"),
                        })
                    }
                })
            }
            "noise" => {
                self.noise = Some(match value.to_ascii_lowercase().as_str() {
                    "laplace" => NoiseKind::Laplace,
                    "gaussian" => NoiseKind::Gaussian,
                    _ => {
                        return Err(DpError::InvalidOption {
                            option: name.clone(),
                            detail: format!("`{value}` is not laplace or gaussian"),
                        })
                    }
                })
            }
            other => {
                return Err(DpError::InvalidOption {
                    option: other.to_string(),
                    detail: format!("unknown option; known options are {}", OPTION_NAMES.join(", ")),
                })
            }
        }
        Ok(())
    }

    /// Options of `self` override those of `base`.
    pub fn over(&self, base: &QueryOptions) -> QueryOptions {
        QueryOptions {
            epsilon: self.epsilon.or(base.epsilon),
            delta: self.delta.or(base.delta),
            max_groups_contributed: self.max_groups_contributed.or(base.max_groups_contributed),
            max_contributions_per_group: self
                .max_contributions_per_group
                .or(base.max_contributions_per_group),
            privacy_unit_column: self
                .privacy_unit_column
                .clone()
                .or_else(|| base.privacy_unit_column.clone()),
            confidence_intervals: self.confidence_intervals.or(base.confidence_intervals),
            noise: self.noise.or(base.noise),
        }
    }

    /// Apply the manifest's defaults and check every range.
    pub fn resolve(&self, defaults: &Defaults) -> Result<ResolvedOptions> {
        let epsilon = self.epsilon.unwrap_or(defaults.epsilon);
        if !epsilon.is_finite() || epsilon <= 0.0 {
            return Err(DpError::InvalidOption {
                option: "epsilon".into(),
                detail: format!("must be a finite number above 0, got {epsilon}"),
            });
        }
        if epsilon < defaults.min_epsilon_per_query {
            return Err(DpError::InvalidOption {
                option: "epsilon".into(),
                detail: format!(
                    "{epsilon} is below the collaboration's minimum of {} per query",
                    defaults.min_epsilon_per_query
                ),
            });
        }
        if epsilon > defaults.max_epsilon_per_query {
            return Err(DpError::InvalidOption {
                option: "epsilon".into(),
                detail: format!(
                    "{epsilon} is above the collaboration's cap of {} per query",
                    defaults.max_epsilon_per_query
                ),
            });
        }
        let delta = self.delta.unwrap_or(defaults.delta);
        if !(0.0..1.0).contains(&delta) {
            return Err(DpError::InvalidOption {
                option: "delta".into(),
                detail: format!("must be at least 0 and below 1, got {delta}"),
            });
        }
        if delta > defaults.max_delta_per_query {
            return Err(DpError::InvalidOption {
                option: "delta".into(),
                detail: format!(
                    "{delta} is above the collaboration's cap of {} per query",
                    defaults.max_delta_per_query
                ),
            });
        }
        let bound = |option: &str, value: u32| -> Result<u32> {
            if value == 0 || value > MAX_CONTRIBUTION_BOUND {
                return Err(DpError::InvalidOption {
                    option: option.into(),
                    detail: format!("must be between 1 and {MAX_CONTRIBUTION_BOUND}, got {value}"),
                });
            }
            Ok(value)
        };
        Ok(ResolvedOptions {
            privacy_unit_column: self.privacy_unit_column.clone(),
            confidence_intervals: self.confidence_intervals.unwrap_or(false),
            noise: self.noise.unwrap_or_default(),
            epsilon,
            delta,
            max_groups_contributed: bound(
                "max_groups_contributed",
                self.max_groups_contributed
                    .unwrap_or(defaults.max_groups_contributed),
            )?,
            max_contributions_per_group: bound(
                "max_contributions_per_group",
                self.max_contributions_per_group
                    .unwrap_or(defaults.max_contributions_per_group),
            )?,
        })
    }
}

/// Cut the `WITH DIFFERENTIAL_PRIVACY [OPTIONS (…)]` clause out of the one
/// `SELECT` that carries it — at the start of the statement, after `EXPLAIN`,
/// or in the final `SELECT` after a `WITH` list of CTEs — and read its
/// options. SQL without the clause is returned unchanged. Words inside string
/// literals, quoted identifiers and comments are never taken for the clause.
pub fn split_dp_clause(sql: &str) -> Result<(String, QueryOptions)> {
    use datafusion::sql::sqlparser::tokenizer::Token as T;
    let mut options = QueryOptions::default();
    // SQL the tokenizer rejects (an unterminated string, say) goes on as it
    // is: the SQL parser reports the error.
    let Some(tokens) = tokens(sql) else { return Ok((sql.to_string(), options)) };
    let is_word = |t: &Token, w: &str| matches!(&t.token, T::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w));
    let found: Vec<usize> = (0..tokens.len().saturating_sub(2))
        .filter(|&i| {
            is_word(&tokens[i], "SELECT") && is_word(&tokens[i + 1], "WITH") && is_word(&tokens[i + 2], "DIFFERENTIAL_PRIVACY")
        })
        .collect();
    let Some(&at) = found.first() else {
        return Ok((sql.to_string(), options));
    };
    if found.len() > 1 {
        return Err(DpError::InvalidOption {
            option: "WITH DIFFERENTIAL_PRIVACY".into(),
            detail: "a query has one DP aggregate, so the clause may appear once".into(),
        });
    }
    let cut_from = tokens[at].end;
    let mut cut_to = tokens[at + 2].end;
    if tokens.get(at + 3).is_some_and(|t| is_word(t, "OPTIONS")) {
        if !tokens.get(at + 4).is_some_and(|t| t.token == T::LParen) {
            return Err(DpError::InvalidOption { option: "OPTIONS".into(), detail: "expected `(` after OPTIONS".into() });
        }
        let list = &tokens[at + 5..];
        let close = list.iter().position(|t| t.token == T::RParen).ok_or_else(|| DpError::InvalidOption {
            option: "OPTIONS".into(),
            detail: "missing `)` closing the OPTIONS list".into(),
        })?;
        for pair in list[..close].split(|t| t.token == T::Comma) {
            let Some(first) = pair.first() else { continue };
            let text = |ts: &[Token]| match (ts.first(), ts.last()) {
                (Some(a), Some(b)) => sql[a.start..b.end].to_string(),
                _ => String::new(),
            };
            let Some(eq) = pair.iter().position(|t| t.token == T::Eq) else {
                return Err(DpError::InvalidOption { option: text(pair), detail: "expected `name = value`".into() });
            };
            let value = &pair[eq + 1..];
            if eq != 1 || value.is_empty() {
                return Err(DpError::InvalidOption { option: text(pair), detail: "expected `name = value`".into() });
            }
            let name = match &first.token {
                T::Word(w) => w.value.clone(),
                _ => text(&pair[..1]),
            };
            // A quoted value is read without its quotes (and may hold a comma).
            let value = match value {
                [Token { token: T::SingleQuotedString(v) | T::DoubleQuotedString(v), .. }] => v.clone(),
                _ => text(value),
            };
            options.set(&name, &value)?;
        }
        cut_to = list[close].end;
    }
    Ok((format!("{} {}", &sql[..cut_from], &sql[cut_to..]), options))
}

/// A token of SQL text (not whitespace or a comment) and its byte offsets.
struct Token {
    start: usize,
    end: usize,
    token: datafusion::sql::sqlparser::tokenizer::Token,
}

/// The tokens of `sql` as DataFusion's SQL tokenizer reads them (so string
/// literals, quoted identifiers and comments are never taken for words),
/// without whitespace and comments; None if it cannot tokenize `sql`.
fn tokens(sql: &str) -> Option<Vec<Token>> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Location, Token as T, Tokenizer};
    let spanned = Tokenizer::new(&GenericDialect {}, sql).tokenize_with_location().ok()?;
    // The tokenizer gives (line, column) in characters, from 1: map them to
    // byte offsets through each character's offset and each line's first
    // character.
    let mut char_offsets: Vec<usize> = Vec::with_capacity(sql.len() + 1);
    let mut line_first_char = vec![0usize];
    for (n, (i, c)) in sql.char_indices().enumerate() {
        char_offsets.push(i);
        if c == '\n' {
            line_first_char.push(n + 1);
        }
    }
    char_offsets.push(sql.len());
    let offset = |l: Location| -> usize {
        let first = line_first_char.get((l.line as usize).saturating_sub(1)).copied().unwrap_or(0);
        char_offsets.get(first + (l.column as usize).saturating_sub(1)).copied().unwrap_or(sql.len())
    };
    Some(
        spanned
            .into_iter()
            .filter(|t| !matches!(t.token, T::Whitespace(_) | T::EOF))
            .map(|t| Token { start: offset(t.span.start), end: offset(t.span.end), token: t.token })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clause_is_cut_and_its_options_read() {
        let (sql, o) = split_dp_clause(
            "select with differential_privacy options (epsilon = 0.5, max_groups_contributed = 2) channel, count(*) from t group by channel",
        )
        .unwrap();
        assert_eq!(sql, "select  channel, count(*) from t group by channel");
        assert_eq!(o.epsilon, Some(0.5));
        assert_eq!(o.max_groups_contributed, Some(2));
    }

    #[test]
    fn sql_without_clause_is_unchanged() {
        let (sql, o) = split_dp_clause("SELECT channel FROM t").unwrap();
        assert_eq!(sql, "SELECT channel FROM t");
        assert_eq!(o, QueryOptions::default());
    }

    #[test]
    fn nan_zero_negative_and_capped_epsilon_are_refused() {
        let d = Defaults::default();
        for bad in ["NaN", "0", "-1", "inf", "1000", "1e-300", "0.001"] {
            let mut o = QueryOptions::default();
            o.set("epsilon", bad).unwrap();
            assert!(o.resolve(&d).is_err(), "epsilon = {bad} was accepted");
        }
    }

    #[test]
    fn delta_of_one_is_refused() {
        let mut o = QueryOptions::default();
        o.set("delta", "1").unwrap();
        assert!(o.resolve(&Defaults::default()).is_err());
    }

    #[test]
    fn clause_after_ctes_and_explain_is_found_but_not_inside_strings_or_comments() {
        let (sql, o) = split_dp_clause(
            "EXPLAIN WITH x AS (SELECT uid FROM t) SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2) COUNT(*) FROM x",
        )
        .unwrap();
        assert_eq!(sql, "EXPLAIN WITH x AS (SELECT uid FROM t) SELECT  COUNT(*) FROM x");
        assert_eq!(o.epsilon, Some(2.0));
        let quoted = "SELECT 'SELECT WITH DIFFERENTIAL_PRIVACY' -- SELECT WITH DIFFERENTIAL_PRIVACY\n FROM t";
        assert_eq!(split_dp_clause(quoted).unwrap().0, quoted);
        assert!(split_dp_clause("SELECT WITH DIFFERENTIAL_PRIVACY 1 UNION ALL SELECT WITH DIFFERENTIAL_PRIVACY 2").is_err());
    }

    #[test]
    fn a_quoted_value_may_hold_a_comma_and_an_equals_sign() {
        let (sql, o) = split_dp_clause(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (privacy_unit_column = 'a,b=c', epsilon = 1)\n  COUNT(*) FROM t -- é",
        )
        .unwrap();
        assert_eq!(o.privacy_unit_column.as_deref(), Some("a,b=c"));
        assert_eq!(o.epsilon, Some(1.0));
        assert_eq!(sql, "SELECT \n  COUNT(*) FROM t -- é");
        // Offsets survive characters of several bytes before the clause.
        let (sql, o) = split_dp_clause("SELECT 'é' AS x; SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 3) 1").unwrap();
        assert_eq!(o.epsilon, Some(3.0));
        assert_eq!(sql, "SELECT 'é' AS x; SELECT  1");
        assert!(split_dp_clause("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon 1) 1").is_err());
    }

    #[test]
    fn unknown_option_is_refused() {
        assert!(split_dp_clause("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilonn = 1) 1").is_err());
    }
}
