//! Scalar functions that rewritten DP plans call. They travel to Ballista
//! executors by name, so every process that executes plans registers
//! [`all`] (the executor crate does).

use std::hash::Hasher;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray, UInt64Builder};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::common::{exec_err, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use siphasher::sip::SipHasher13;

/// Every function a rewritten plan may call, besides the total forms of the
/// session's own functions ([`crate::total::total_versions`]).
pub fn all() -> Vec<Arc<ScalarUDF>> {
    let mut functions = vec![Arc::new(ScalarUDF::new_from_impl(ContributionKey::new()))];
    functions.extend(crate::total::all_operators());
    functions
}

/// `cleanroom_contribution_key(salt, uid, g1, …)`: a keyed hash of a person and
/// one of its groups.
///
/// Why it is private: when a person contributes to more groups than
/// `max_groups_contributed`, the planner keeps the groups with the smallest key.
/// The key depends only on the salt, the person's own identifier and the group
/// key, never on another person's rows or on measure values, so the bound on a
/// person's contribution (and hence the sensitivity) holds whatever the data is.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ContributionKey {
    signature: Signature,
}

pub const CONTRIBUTION_KEY: &str = "cleanroom_contribution_key";

impl ContributionKey {
    pub fn new() -> Self {
        ContributionKey {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl Default for ContributionKey {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for ContributionKey {
    fn name(&self) -> &str {
        CONTRIBUTION_KEY
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let Some((salt, columns)) = args.args.split_first() else {
            return exec_err!("{CONTRIBUTION_KEY} needs a salt and at least one column");
        };
        let salt = match salt {
            ColumnarValue::Scalar(ScalarValue::Int64(Some(s))) => *s as u64,
            _ => return exec_err!("{CONTRIBUTION_KEY}: the salt must be a non-null Int64 literal"),
        };
        // Every column is hashed through its text form, so a key does not depend
        // on the physical type a file happened to use.
        let texts: Vec<ArrayRef> = columns
            .iter()
            .map(|c| cast(&c.to_array(rows)?, &DataType::Utf8).map_err(Into::into))
            .collect::<Result<_>>()?;
        let texts: Vec<&StringArray> = texts
            .iter()
            .map(|a| a.as_any().downcast_ref::<StringArray>().expect("cast to Utf8"))
            .collect();
        let mut out = UInt64Builder::with_capacity(rows);
        for row in 0..rows {
            let mut h = SipHasher13::new_with_keys(salt, 0x636c_6561_6e72_6f6f);
            for col in &texts {
                if col.is_null(row) {
                    h.write_u8(0);
                } else {
                    h.write_u8(1);
                    let v = col.value(row).as_bytes();
                    h.write_usize(v.len());
                    h.write(v);
                }
            }
            out.append_value(h.finish());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}
