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
    let mut options = QueryOptions::default();
    let tokens = tokens(sql);
    let is_word = |t: &Token, w: &str| t.word && sql[t.start..t.end].eq_ignore_ascii_case(w);
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
        let open = tokens.get(at + 4).filter(|t| !t.word && &sql[t.start..t.end] == "(").ok_or_else(|| DpError::InvalidOption {
            option: "OPTIONS".into(),
            detail: "expected `(` after OPTIONS".into(),
        })?;
        let close = tokens[at + 5..]
            .iter()
            .find(|t| !t.word && &sql[t.start..t.end] == ")")
            .ok_or_else(|| DpError::InvalidOption {
                option: "OPTIONS".into(),
                detail: "missing `)` closing the OPTIONS list".into(),
            })?;
        for pair in sql[open.end..close.start].split(',') {
            if pair.trim().is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').ok_or_else(|| DpError::InvalidOption {
                option: pair.trim().to_string(),
                detail: "expected `name = value`".into(),
            })?;
            options.set(name, value)?;
        }
        cut_to = close.end;
    }
    Ok((format!("{} {}", &sql[..cut_from], &sql[cut_to..]), options))
}

/// A word (keyword or identifier) or one punctuation character of SQL text,
/// by byte offsets.
struct Token {
    start: usize,
    end: usize,
    word: bool,
}

/// The words and punctuation of `sql`, skipping whitespace, comments, string
/// literals and quoted identifiers (which can never be the clause).
fn tokens(sql: &str) -> Vec<Token> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let is_word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_whitespace() {
            i += 1;
        } else if b == b'-' && bytes.get(i + 1) == Some(&b'-') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if b == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(bytes.len());
        } else if b == b'\'' || b == b'"' || b == b'`' {
            // A quoted string or identifier; a doubled quote is an escaped one.
            i += 1;
            loop {
                match bytes.get(i) {
                    None => break,
                    Some(&q) if q == b && bytes.get(i + 1) == Some(&b) => i += 2,
                    Some(&q) if q == b => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            out.push(Token { start: i, end: i, word: false });
        } else if is_word_byte(b) {
            let start = i;
            while i < bytes.len() && is_word_byte(bytes[i]) {
                i += 1;
            }
            out.push(Token { start, end: i, word: true });
        } else {
            out.push(Token { start: i, end: i + 1, word: false });
            i += 1;
        }
    }
    out
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
    fn unknown_option_is_refused() {
        assert!(split_dp_clause("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilonn = 1) 1").is_err());
    }
}
