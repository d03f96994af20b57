//! Errors of the DP planner. A refusal always names the rule it enforces and,
//! where there is one, what the analyst can write instead. Every message here is
//! derived from the SQL text, the policy and the ledger, never from protected data.

use thiserror::Error;

macro_rules! rules {
    ($($variant:ident => $name:literal,)*) => {
        /// The rule a refusal enforces. The README's table of refusals lists
        /// exactly these (a test compares them).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Rule {
            $($variant,)*
        }

        impl Rule {
            /// Every rule.
            pub const ALL: &'static [Rule] = &[$(Rule::$variant,)*];

            /// The rule's name, as refusals, the audit log and metrics show it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Rule::$variant => $name,)*
                }
            }
        }
    };
}

rules! {
    AnswerSize => "answer_size",
    CrossJoin => "cross_join",
    Describe => "describe",
    DpAggregateRequired => "dp_aggregate_required",
    Explain => "explain",
    ExplainAnalyze => "explain_analyze",
    FunctionLiteral => "function_literal",
    FunctionNotAllowed => "function_not_allowed",
    GaussianDelta => "gaussian_delta",
    GroupKeyPublicDomain => "group_key_public_domain",
    GroupKeyType => "group_key_type",
    GroupingSets => "grouping_sets",
    HiddenColumn => "hidden_column",
    IntegerDivision => "integer_division",
    JoinKeyUse => "join_key_use",
    JoinOnPrivacyUnit => "join_on_privacy_unit",
    JoinType => "join_type",
    LimitBelowDpAggregate => "limit_below_dp_aggregate",
    MaxOutputGroups => "max_output_groups",
    MeasureBounds => "measure_bounds",
    NestedAggregate => "nested_aggregate",
    NoiseCalibration => "noise_calibration",
    Parameters => "parameters",
    PartitionSelectionDelta => "partition_selection_delta",
    PrivacyUnit => "privacy_unit",
    PrivacyUnitInOutput => "privacy_unit_in_output",
    PublicDataset => "public_dataset",
    PublicOuterJoin => "public_outer_join",
    QuantileNoise => "quantile_noise",
    ReadOnly => "read_only",
    Statement => "statement",
    StatementShape => "statement_shape",
    StatementSize => "statement_size",
    Subquery => "subquery",
    SumOfMeasure => "sum_of_measure",
    SupportedAggregates => "supported_aggregates",
    SystemTablesAlone => "system_tables_alone",
    UnionOfProtectedAndPublic => "union_of_protected_and_public",
    UnionPrivacyUnit => "union_privacy_unit",
    UnknownDataset => "unknown_dataset",
    UnsupportedExpression => "unsupported_expression",
    UnsupportedShape => "unsupported_shape",
    WindowFrame => "window_frame",
    WindowPartition => "window_partition",
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error)]
pub enum DpError {
    /// The query breaks a privacy rule; it is refused at planning, before any data is read.
    #[error("query refused by rule `{rule}`: {detail}{}", alternative.as_ref().map(|a| format!(". Allowed instead: {a}")).unwrap_or_default())]
    Refused {
        rule: Rule,
        detail: String,
        alternative: Option<String>,
    },
    /// A DP option is missing, malformed or out of its allowed range.
    #[error("invalid differential-privacy option `{option}`: {detail}")]
    InvalidOption { option: String, detail: String },
    /// The party's budget or the collaboration's cap does not cover the query.
    #[error(transparent)]
    Budget(#[from] crate::accountant::BudgetRefusal),
    /// The statement cannot be parsed or planned as SQL (before any DP rule).
    #[error("{0}")]
    Sql(datafusion::error::DataFusionError),
    #[error("planning error: {0}")]
    Plan(#[from] datafusion::error::DataFusionError),
    #[error("noise mechanism error: {0}")]
    Mechanism(String),
    #[error("budget ledger error: {0}")]
    Ledger(String),
    /// The ledger did not answer in time; nothing that needs it can go on.
    #[error("the budget ledger is unreachable: {0}")]
    LedgerUnavailable(String),
}

impl DpError {
    pub fn refused(rule: Rule, detail: impl Into<String>) -> Self {
        DpError::Refused {
            rule,
            detail: detail.into(),
            alternative: None,
        }
    }

    pub fn refused_with(
        rule: Rule,
        detail: impl Into<String>,
        alternative: impl Into<String>,
    ) -> Self {
        DpError::Refused {
            rule,
            detail: detail.into(),
            alternative: Some(alternative.into()),
        }
    }

    /// The rule a refusal enforces, if this is a refusal.
    pub fn refusal_rule(&self) -> Option<Rule> {
        match self {
            DpError::Refused { rule, .. } => Some(*rule),
            _ => None,
        }
    }

    /// What the audit log and metrics file this failure under: the rule of a
    /// refusal or of a budget refusal, `option` for a bad option, `sql` for
    /// anything else that stops a statement before it runs.
    pub fn audit_rule(&self) -> &'static str {
        match self {
            DpError::Refused { rule, .. } => rule.name(),
            DpError::Budget(refusal) => refusal.rule(),
            DpError::InvalidOption { .. } => "option",
            _ => "sql",
        }
    }

    /// The rule a refusal names, if this is a refusal.
    pub fn rule(&self) -> Option<&'static str> {
        match self {
            DpError::Refused { rule, .. } => Some(rule.name()),
            _ => None,
        }
    }
}

pub type Result<T, E = DpError> = std::result::Result<T, E>;
