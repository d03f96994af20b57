//! What the planner is allowed to assume about the data: which datasets are
//! protected and by which privacy-unit column, what role each column plays,
//! the public domains of dimensions and the bounds of measures, and the
//! defaults a query inherits when it says nothing.
//!
//! The policy is built by the gateway from the collaboration manifest; the
//! planner never reads a manifest file itself. Everything here is public
//! knowledge (it is in the manifest every party sees), so it may appear in
//! error messages and EXPLAIN output.

use std::collections::BTreeMap;

/// The role a column plays in DP queries.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnRole {
    /// The privacy-unit column (one person per value) or another join key.
    /// It may be counted distinctly and joined on, never output or grouped by.
    JoinKey,
    /// A column that may be grouped by and compared with literals.
    /// `groups_per_person`: how many of its values one person may have, as
    /// the manifest declares; a query that groups by it and sets no
    /// `max_groups_contributed` lets each person contribute to that many
    /// groups, so no person's groups are dropped when the declaration
    /// holds. (The bound is still enforced: a declaration the data breaks
    /// costs accuracy, never privacy.)
    Dimension { domain: Option<Domain>, groups_per_person: Option<u32> },
    /// A numeric column that may be aggregated, clamped to `[lower, upper]`.
    Measure { lower: f64, upper: f64 },
    /// A column that no query may reference.
    Hidden,
}

/// A public, data-independent set of values a dimension can take.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// An enumerated list of string keys.
    Strings(Vec<String>),
    /// Every integer in `min..=max`.
    IntRange { min: i64, max: i64 },
    /// Every day in `from..=to`, as days since 1970-01-01 (Arrow's `Date32`).
    /// On a timestamp or date column it is the domain of the column's day,
    /// `CAST(col AS DATE)`.
    DateRange { from: i32, to: i32 },
    /// The periods a date range falls into: the domain of
    /// `DATE_TRUNC(grain, col)` (and of its `CAST(… AS DATE)`) for a column
    /// with the domain `DateRange { from, to }`. Its values are the first
    /// days of the periods from the one holding `from` to the one holding
    /// `to`, as days since 1970-01-01; derived from the manifest alone.
    Periods { from: i32, to: i32, grain: Grain },
}

/// A calendar period `DATE_TRUNC` truncates to (weeks start on Monday, as
/// DataFusion's do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

impl Grain {
    /// The grain `DATE_TRUNC` names with `unit` (lower case).
    pub fn of_unit(unit: &str) -> Option<Grain> {
        Some(match unit {
            "day" => Grain::Day,
            "week" => Grain::Week,
            "month" => Grain::Month,
            "quarter" => Grain::Quarter,
            "year" => Grain::Year,
            _ => return None,
        })
    }

    /// The first day of the period holding `day` (days since 1970-01-01).
    pub fn start(self, day: i32) -> i32 {
        use chrono::Datelike;
        let date = |d: i32| chrono::NaiveDate::from_num_days_from_ce_opt(d + EPOCH_CE_DAYS);
        let days = |date: chrono::NaiveDate| date.num_days_from_ce() - EPOCH_CE_DAYS;
        match self {
            Grain::Day => day,
            // 1970-01-01 was a Thursday: Monday is 3 days before it.
            Grain::Week => day - (day + 3).rem_euclid(7),
            Grain::Month | Grain::Quarter | Grain::Year => {
                let Some(d) = date(day) else { return day };
                let month = match self {
                    Grain::Month => d.month(),
                    Grain::Quarter => (d.month() - 1) / 3 * 3 + 1,
                    _ => 1,
                };
                chrono::NaiveDate::from_ymd_opt(d.year(), month, 1).map(days).unwrap_or(day)
            }
        }
    }

    /// The first day of the period after the one starting on `start`.
    fn next(self, start: i32) -> i32 {
        let months = match self {
            Grain::Day => return start + 1,
            Grain::Week => return start + 7,
            Grain::Month => 1,
            Grain::Quarter => 3,
            Grain::Year => 12,
        };
        chrono::NaiveDate::from_num_days_from_ce_opt(start + EPOCH_CE_DAYS)
            .and_then(|d| d.checked_add_months(chrono::Months::new(months)))
            .map(|d| chrono::Datelike::num_days_from_ce(&d) - EPOCH_CE_DAYS)
            .unwrap_or(i32::MAX)
    }

    /// The first days of the periods that meet `from..=to`.
    pub fn periods(self, from: i32, to: i32) -> Vec<i32> {
        let mut out = Vec::new();
        let mut start = self.start(from);
        while start <= to {
            out.push(start);
            start = self.next(start);
        }
        out
    }
}

/// Whether `t` is a timestamp without a time zone or in UTC: one whose
/// `DATE_TRUNC` and `CAST(… AS DATE)` fall on UTC days, as a day range's do.
pub fn utc_timestamp(t: &arrow::datatypes::DataType) -> bool {
    match t {
        arrow::datatypes::DataType::Timestamp(_, None) => true,
        arrow::datatypes::DataType::Timestamp(_, Some(zone)) => matches!(zone.as_ref(), "UTC" | "utc" | "Z" | "+00:00" | "Etc/UTC"),
        _ => false,
    }
}

/// Days from 0001-01-01 (chrono's day 1) to 1970-01-01.
const EPOCH_CE_DAYS: i32 = 719_163;

impl Domain {
    pub fn len(&self) -> usize {
        match self {
            Domain::Strings(v) => v.len(),
            Domain::IntRange { min, max } => (max - min + 1).max(0) as usize,
            Domain::DateRange { from, to } => (*to as i64 - *from as i64 + 1).max(0) as usize,
            Domain::Periods { from, to, grain } => grain.periods(*from, *to).len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The days of a date domain (days since 1970-01-01), in order; empty
    /// for other domains.
    pub fn days(&self) -> Vec<i32> {
        match self {
            Domain::DateRange { from, to } => (*from..=*to).collect(),
            Domain::Periods { from, to, grain } => grain.periods(*from, *to),
            _ => Vec::new(),
        }
    }

    /// Whether the domain's values are dates (a key of it is matched and
    /// released as a `Date32`).
    pub fn is_dates(&self) -> bool {
        matches!(self, Domain::DateRange { .. } | Domain::Periods { .. })
    }

    /// Every value of the domain as text, in domain order (dates as
    /// `YYYY-MM-DD`, Arrow's text form of a `Date32`).
    pub fn values(&self) -> Vec<String> {
        match self {
            Domain::Strings(v) => v.clone(),
            Domain::IntRange { min, max } => (*min..=*max).map(|v| v.to_string()).collect(),
            Domain::DateRange { .. } | Domain::Periods { .. } => {
                let days = arrow::array::Date32Array::from_iter_values(self.days());
                let text = arrow::compute::cast(&days, &arrow::datatypes::DataType::Utf8).expect("dates format as text");
                let text = text.as_any().downcast_ref::<arrow::array::StringArray>().expect("utf8");
                text.iter().map(|v| v.unwrap_or_default().to_string()).collect()
            }
        }
    }
}

/// Parse a `YYYY-MM-DD` date into days since 1970-01-01.
pub fn parse_date(text: &str) -> Option<i32> {
    use arrow::compute::kernels::cast_utils::Parser;
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10 && bytes[4] == b'-' && bytes[7] == b'-';
    if !shaped {
        return None;
    }
    arrow::datatypes::Date32Type::parse(text)
}

/// One dataset as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetPolicy {
    pub name: String,
    /// `Some(column)` for a protected dataset, `None` for a public one.
    pub privacy_unit: Option<String>,
    /// Declared columns; a column that is not declared is treated as hidden.
    pub columns: BTreeMap<String, ColumnRole>,
    /// The dataset's default bound on a person's rows per group, for
    /// queries that set none (enforced like the option).
    pub max_contributions_per_group: Option<u32>,
}

impl DatasetPolicy {
    pub fn role(&self, column: &str) -> ColumnRole {
        self.columns
            .get(column)
            .cloned()
            .unwrap_or(ColumnRole::Hidden)
    }
}

/// Defaults and caps that apply when a query does not say otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// ε charged by a query that names none.
    pub epsilon: f64,
    /// The largest ε a single query may ask for.
    pub max_epsilon_per_query: f64,
    /// The smallest ε a query may ask for: no probe of the data is free, so
    /// repeated probes (of timing, say, which the guarantee does not cover)
    /// use up the budget.
    pub min_epsilon_per_query: f64,
    /// δ a query may spend when it names none: what DP partition selection
    /// (group keys without a public domain) and Gaussian noise may use. 0
    /// keeps queries pure ε-DP; they then need a public domain for every key.
    pub delta: f64,
    /// The largest δ a single query may ask for.
    pub max_delta_per_query: f64,
    /// How many groups one person may contribute to in one query.
    pub max_groups_contributed: u32,
    /// How many rows one person may contribute to one group.
    pub max_contributions_per_group: u32,
    /// Largest number of groups a public-domain GROUP BY may enumerate.
    pub max_output_groups: usize,
    /// When set, a query that joins protected data reads at most this many
    /// rows of each person from each protected dataset (chosen by a keyed
    /// hash of the row), so a self-join cannot make a person with r rows
    /// cost r³ of time or memory.
    pub max_rows_per_person: Option<u32>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            epsilon: 1.0,
            max_epsilon_per_query: 10.0,
            min_epsilon_per_query: 0.01,
            delta: 0.0,
            max_delta_per_query: 1e-5,
            max_groups_contributed: 1,
            max_contributions_per_group: 10,
            max_output_groups: 100_000,
            max_rows_per_person: None,
        }
    }
}

/// The datasets one party may query, and the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub datasets: BTreeMap<String, DatasetPolicy>,
    pub defaults: Defaults,
    /// Each study's default parameters (`[studies.<kind>]` in the
    /// manifest), by study and parameter name.
    pub studies: BTreeMap<String, BTreeMap<String, String>>,
}

impl Policy {
    pub fn dataset(&self, name: &str) -> Option<&DatasetPolicy> {
        self.datasets.get(name)
    }
}
