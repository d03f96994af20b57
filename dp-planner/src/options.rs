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
];

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
}

/// Options after defaults were applied and ranges checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedOptions {
    pub epsilon: f64,
    pub max_groups_contributed: u32,
    pub max_contributions_per_group: u32,
    pub privacy_unit_column: Option<String>,
    pub confidence_intervals: bool,
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
        if epsilon > defaults.max_epsilon_per_query {
            return Err(DpError::InvalidOption {
                option: "epsilon".into(),
                detail: format!(
                    "{epsilon} is above the collaboration's cap of {} per query",
                    defaults.max_epsilon_per_query
                ),
            });
        }
        if let Some(delta) = self.delta {
            if !(0.0..1.0).contains(&delta) {
                return Err(DpError::InvalidOption {
                    option: "delta".into(),
                    detail: format!("must be at least 0 and below 1, got {delta}"),
                });
            }
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
            epsilon,
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

/// Split `[EXPLAIN [ANALYZE] [VERBOSE]] SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (…) rest` into the
/// plain `[EXPLAIN] SELECT rest` and the options. SQL without the clause is
/// returned unchanged.
pub fn split_dp_clause(sql: &str) -> Result<(String, QueryOptions)> {
    let mut options = QueryOptions::default();
    let trimmed = sql.trim_start();
    let mut words = Words { text: trimmed, pos: 0 };
    let mut prefix = String::new();
    if words.keyword("EXPLAIN") {
        prefix.push_str("EXPLAIN ");
        for modifier in ["ANALYZE", "VERBOSE"] {
            if words.keyword(modifier) {
                prefix.push_str(modifier);
                prefix.push(' ');
            }
        }
    }
    let is_clause = words.keyword("SELECT")
        && words.keyword("WITH")
        && words.keyword("DIFFERENTIAL_PRIVACY");
    if !is_clause {
        return Ok((sql.to_string(), options));
    }
    if words.keyword("OPTIONS") {
        let rest = &trimmed[words.pos..];
        let rest_trimmed = rest.trim_start();
        if !rest_trimmed.starts_with('(') {
            return Err(DpError::InvalidOption {
                option: "OPTIONS".into(),
                detail: "expected `(` after OPTIONS".into(),
            });
        }
        let open = trimmed.len() - rest_trimmed.len();
        let close = trimmed[open..].find(')').ok_or_else(|| DpError::InvalidOption {
            option: "OPTIONS".into(),
            detail: "missing `)` closing the OPTIONS list".into(),
        })? + open;
        for pair in trimmed[open + 1..close].split(',') {
            if pair.trim().is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').ok_or_else(|| DpError::InvalidOption {
                option: pair.trim().to_string(),
                detail: "expected `name = value`".into(),
            })?;
            options.set(name, value)?;
        }
        words.pos = close + 1;
    }
    Ok((format!("{prefix}SELECT {}", &trimmed[words.pos..]), options))
}

/// A tiny case-insensitive keyword reader over the head of a SQL string.
struct Words<'a> {
    text: &'a str,
    pos: usize,
}

impl Words<'_> {
    fn keyword(&mut self, word: &str) -> bool {
        let rest = &self.text[self.pos..];
        let start = rest.len() - rest.trim_start().len();
        let candidate = &rest[start..];
        let matches = candidate.len() >= word.len()
            && candidate[..word.len()].eq_ignore_ascii_case(word)
            && candidate[word.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if matches {
            self.pos += start + word.len();
        }
        matches
    }
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
        assert_eq!(sql, "SELECT  channel, count(*) from t group by channel");
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
        for bad in ["NaN", "0", "-1", "inf", "1000"] {
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
    fn unknown_option_is_refused() {
        assert!(split_dp_clause("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilonn = 1) 1").is_err());
    }
}
