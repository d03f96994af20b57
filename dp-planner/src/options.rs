//! The privacy parameters of one query.
//!
//! A query names them in BigQuery's syntax,
//! `SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, max_groups_contributed = 2) …`,
//! or, in SQL any parser accepts (what BI tools check before they send), in a
//! hint comment: `SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = 0.5) */ …`; or it
//! inherits them from the session (`SET cleanroom.…`, Flight session
//! options), the connection's `x-cleanroom-<option>` headers and the
//! manifest's defaults. The clause is cut from the SQL text before DataFusion
//! parses the rest; values are checked here so that a NaN, a non-positive ε or
//! an ε above the per-query cap never reaches a mechanism.

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
    "clamp_counts",
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
    /// Report a noisy count below 0 (and its interval's ends) as 0.
    pub clamp_counts: Option<bool>,
    /// How the query's budget is split across its noisy columns, when not
    /// evenly; set by a study (not an SQL option).
    pub column_split: Option<ColumnSplit>,
    /// The study the query answers, with every parameter it ran with
    /// (`lift(exposure => 'impressions', …)`); set by a study.
    pub study: Option<String>,
}

/// Weights of the DP aggregate's columns in the split of the query's
/// budget (in the aggregate's column order), and why they were chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSplit {
    pub weights: Vec<f64>,
    pub why: String,
}

/// The value of a set option, typed as a client shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    Number(f64),
    Count(u32),
    Flag(bool),
    Text(String),
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
    /// Whether the query, session or connection chose each bound; when not,
    /// the planner derives it from the manifest's declarations for the
    /// columns and datasets the query reads (`groups_per_person`, a
    /// dataset's `max_contributions_per_group`), falling back to the
    /// defaults above.
    pub bounds_chosen: BoundsChosen,
    pub privacy_unit_column: Option<String>,
    pub confidence_intervals: bool,
    pub noise: NoiseKind,
    pub clamp_counts: bool,
    pub column_split: Option<ColumnSplit>,
    pub study: Option<String>,
}

/// Which contribution bounds a query, session or connection set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoundsChosen {
    pub groups: bool,
    pub rows: bool,
}

/// Largest per-person group or row bound a query may ask for: beyond it the
/// noise would drown every answer, and it keeps sensitivities far from overflow.
pub const MAX_CONTRIBUTION_BOUND: u32 = 10_000;

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
        let flag = || -> Result<bool> {
            match value.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(DpError::InvalidOption { option: name.clone(), detail: format!("`{value}` is not true or false") }),
            }
        };
        match name.as_str() {
            "epsilon" => self.epsilon = Some(number()?),
            "delta" => self.delta = Some(number()?),
            "max_groups_contributed" => self.max_groups_contributed = Some(count()?),
            "max_contributions_per_group" => self.max_contributions_per_group = Some(count()?),
            "privacy_unit_column" => self.privacy_unit_column = Some(value.to_string()),
            "confidence_intervals" => self.confidence_intervals = Some(flag()?),
            "clamp_counts" => self.clamp_counts = Some(flag()?),
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

    /// Forget one option (back to the default); `name` as for [`Self::set`].
    pub fn unset(&mut self, name: &str) -> Result<()> {
        match name.trim().to_ascii_lowercase().as_str() {
            "epsilon" => self.epsilon = None,
            "delta" => self.delta = None,
            "max_groups_contributed" => self.max_groups_contributed = None,
            "max_contributions_per_group" => self.max_contributions_per_group = None,
            "privacy_unit_column" => self.privacy_unit_column = None,
            "confidence_intervals" => self.confidence_intervals = None,
            "noise" => self.noise = None,
            "clamp_counts" => self.clamp_counts = None,
            other => {
                return Err(DpError::InvalidOption {
                    option: other.to_string(),
                    detail: format!("unknown option; known options are {}", OPTION_NAMES.join(", ")),
                })
            }
        }
        Ok(())
    }

    /// The options that are set, by name, with their values.
    pub fn entries(&self) -> Vec<(&'static str, OptionValue)> {
        let mut out = Vec::new();
        if let Some(v) = self.epsilon {
            out.push(("epsilon", OptionValue::Number(v)));
        }
        if let Some(v) = self.delta {
            out.push(("delta", OptionValue::Number(v)));
        }
        if let Some(v) = self.max_groups_contributed {
            out.push(("max_groups_contributed", OptionValue::Count(v)));
        }
        if let Some(v) = self.max_contributions_per_group {
            out.push(("max_contributions_per_group", OptionValue::Count(v)));
        }
        if let Some(v) = &self.privacy_unit_column {
            out.push(("privacy_unit_column", OptionValue::Text(v.clone())));
        }
        if let Some(v) = self.confidence_intervals {
            out.push(("confidence_intervals", OptionValue::Flag(v)));
        }
        if let Some(v) = self.noise {
            let name = match v {
                NoiseKind::Laplace => "laplace",
                NoiseKind::Gaussian => "gaussian",
            };
            out.push(("noise", OptionValue::Text(name.into())));
        }
        if let Some(v) = self.clamp_counts {
            out.push(("clamp_counts", OptionValue::Flag(v)));
        }
        out
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
            clamp_counts: self.clamp_counts.or(base.clamp_counts),
            column_split: self.column_split.clone().or_else(|| base.column_split.clone()),
            study: self.study.clone().or_else(|| base.study.clone()),
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
            bounds_chosen: BoundsChosen {
                groups: self.max_groups_contributed.is_some(),
                rows: self.max_contributions_per_group.is_some(),
            },
            clamp_counts: self.clamp_counts.unwrap_or(false),
            column_split: self.column_split.clone(),
            study: self.study.clone(),
        })
    }
}

/// Cut the `WITH DIFFERENTIAL_PRIVACY [OPTIONS (…)]` clause out of the one
/// `SELECT` that carries it — at the start of the statement, after `EXPLAIN`,
/// or in the final `SELECT` after a `WITH` list of CTEs — and read its
/// options. SQL without the clause is returned unchanged. Words inside string
/// literals, quoted identifiers and comments are never taken for the clause.
///
/// The same options may instead be given in one hint comment anywhere in the
/// statement, `/*+ DIFFERENTIAL_PRIVACY(epsilon = 0.5) */` (also with
/// `OPTIONS`, without the `+`, or as `/* + … */`, the form SQL formatters
/// write back), which leaves the SQL standard; a statement has the clause or
/// the hint, not both.
pub fn split_dp_clause(sql: &str) -> Result<(String, QueryOptions)> {
    let hint = hint_options(sql)?;
    let (rest, clause) = split_clause(sql)?;
    match hint {
        None => Ok((rest, clause)),
        Some(_) if clause != QueryOptions::default() || rest != sql => Err(DpError::InvalidOption {
            option: "DIFFERENTIAL_PRIVACY".into(),
            detail: "give the options either in the WITH DIFFERENTIAL_PRIVACY clause or in a hint comment, not both".into(),
        }),
        Some(options) => Ok((rest, options)),
    }
}

/// The word a hint comment starts with.
const HINT: &str = "DIFFERENTIAL_PRIVACY";

/// The options of the statement's `/*+ DIFFERENTIAL_PRIVACY(…) */` hint, if it
/// has one. Only block comments count (a string literal or quoted identifier
/// holding the words does not); a second hint is an error.
fn hint_options(sql: &str) -> Result<Option<QueryOptions>> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token as T, Tokenizer, Whitespace};
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else { return Ok(None) };
    let hints: Vec<&str> = tokens
        .iter()
        .filter_map(|t| match t {
            T::Whitespace(Whitespace::MultiLineComment(text)) => {
                let text = text.trim().trim_start_matches('+').trim_start();
                let word = text.get(..HINT.len())?;
                let after = text[HINT.len()..].chars().next();
                // The word, then its options: `(` or `OPTIONS` (a comment
                // that merely mentions the word is no hint).
                let rest = text[HINT.len()..].trim_start();
                let options_follow = rest.starts_with('(') || rest.get(..7).is_some_and(|w| w.eq_ignore_ascii_case("OPTIONS"));
                (word.eq_ignore_ascii_case(HINT) && !after.is_some_and(|c| c.is_alphanumeric() || c == '_') && options_follow).then_some(text)
            }
            _ => None,
        })
        .collect();
    let hint = match hints.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => {
            return Err(DpError::InvalidOption {
                option: HINT.into(),
                detail: "a query has one DP aggregate, so the hint may appear once".into(),
            })
        }
    };
    // `DIFFERENTIAL_PRIVACY [OPTIONS] (…)` read as the clause is.
    let rest = hint[HINT.len()..].trim_start();
    let clause = if rest.starts_with('(') { format!("SELECT WITH {HINT} OPTIONS {rest}") } else { format!("SELECT WITH {HINT} {rest}") };
    let (left, options) = split_clause(&clause)?;
    if !left.trim().eq_ignore_ascii_case("SELECT") {
        return Err(DpError::InvalidOption {
            option: HINT.into(),
            detail: format!("the hint holds only `{HINT}(name = value, …)`"),
        });
    }
    Ok(Some(options))
}

/// The `WITH DIFFERENTIAL_PRIVACY` clause cut out of `sql`, and its options.
fn split_clause(sql: &str) -> Result<(String, QueryOptions)> {
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
    fn options_in_a_hint_comment_leave_the_sql_as_it_is() {
        for sql in [
            "SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = 0.5, max_groups_contributed = 5) */ channel, COUNT(*) FROM t GROUP BY channel",
            "SELECT /* + differential_privacy OPTIONS (epsilon = 0.5, max_groups_contributed = 5) */ channel, COUNT(*) FROM t GROUP BY channel",
            "/*+DIFFERENTIAL_PRIVACY(epsilon=0.5,max_groups_contributed=5)*/\nSELECT channel, COUNT(*) FROM t GROUP BY channel",
        ] {
            let (rest, o) = split_dp_clause(sql).unwrap();
            assert_eq!(rest, sql);
            assert_eq!((o.epsilon, o.max_groups_contributed), (Some(0.5), Some(5)), "{sql}");
        }
        // Other comments, and the words in a string, are no hint.
        let plain = "SELECT /* DIFFERENTIAL_PRIVACYX(epsilon = 1) */ /* differential_privacy notes */ 'DIFFERENTIAL_PRIVACY(epsilon = 1)' -- DIFFERENTIAL_PRIVACY(epsilon = 1)\n";
        assert_eq!(split_dp_clause(plain).unwrap().1, QueryOptions::default());
        for bad in [
            "SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = 1) */ /*+ DIFFERENTIAL_PRIVACY(epsilon = 2) */ 1",
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) /*+ DIFFERENTIAL_PRIVACY(epsilon = 2) */ 1",
            "SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = 1) COUNT(*) */ 1",
            "SELECT /*+ DIFFERENTIAL_PRIVACY(epsilonn = 1) */ 1",
        ] {
            assert!(split_dp_clause(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_are_listed_and_unset_by_name() {
        let mut o = QueryOptions::default();
        o.set("epsilon", "0.5").unwrap();
        o.set("noise", "gaussian").unwrap();
        o.set("max_groups_contributed", "3").unwrap();
        assert_eq!(
            o.entries(),
            vec![("epsilon", OptionValue::Number(0.5)), ("max_groups_contributed", OptionValue::Count(3)), ("noise", OptionValue::Text("gaussian".into()))]
        );
        o.unset("epsilon").unwrap();
        assert_eq!(o.epsilon, None);
        assert!(o.unset("epsilonn").is_err());
    }

    #[test]
    fn unknown_option_is_refused() {
        assert!(split_dp_clause("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilonn = 1) 1").is_err());
    }
}
