//! Exact, order-independent sums and averages of floating-point values, for
//! the per-person operators below the DP aggregate.
//!
//! DataFusion adds floats in arrival order, batch by batch and partition by
//! partition; rounding makes the result depend on that order, and the order
//! depends on other people's rows (which file, batch and partition a row
//! lands in). A person's `SUM(revenue)` could then differ in its last bit
//! with or without someone else in the data, and after clamping and rounding
//! to the DP aggregate's grid that bit can move the person's contribution by
//! a whole step (the attack of Casacuberta et al., CCS'22, one level down).
//!
//! [`ExactSum`] (`cleanroom_exact_sum`, `cleanroom_exact_avg`) returns the
//! correctly rounded value of the exact sum of its inputs (Shewchuk's
//! non-overlapping partials, as in Python's `math.fsum`), which is a function
//! of the multiset of values only. To rule out intermediate overflow, every
//! finite value is first scaled by 2^-64 (exact except for values below
//! about 2^-958, which round the same way whatever the order), so partial
//! sums of up to 2^63 values stay below `f64::MAX`; the rounded sum is scaled
//! back at the end. NaN and infinities are counted apart and give NaN, +inf
//! or -inf as IEEE addition would in any order. Partial states merge and
//! rows retract exactly, so window frames and multi-phase aggregation give
//! the same value.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, ListArray, UInt64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, UInt64Type};
use datafusion::common::{exec_err, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility};

pub const EXACT_SUM: &str = "cleanroom_exact_sum";
pub const EXACT_AVG: &str = "cleanroom_exact_avg";

/// 2^-64 and 2^64: scaling by them is exact for normal values.
const SCALE_DOWN: f64 = 1.0 / 18_446_744_073_709_551_616.0;
const SCALE_UP: f64 = 18_446_744_073_709_551_616.0;

/// The two aggregate functions, for registration.
pub fn all() -> Vec<Arc<AggregateUDF>> {
    vec![Arc::new(AggregateUDF::new_from_impl(ExactSum::sum())), Arc::new(AggregateUDF::new_from_impl(ExactSum::avg()))]
}

/// `cleanroom_exact_sum(x DOUBLE)` or `cleanroom_exact_avg(x DOUBLE)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ExactSum {
    signature: Signature,
    average: bool,
}

impl ExactSum {
    pub fn sum() -> Self {
        ExactSum { signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable), average: false }
    }

    pub fn avg() -> Self {
        ExactSum { signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable), average: true }
    }
}

impl AggregateUDFImpl for ExactSum {
    fn name(&self) -> &str {
        if self.average {
            EXACT_AVG
        } else {
            EXACT_SUM
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |name: &str| Field::new_list(format_state_name(args.name, name), Field::new_list_field(DataType::Float64, true), true);
        if args.is_distinct {
            return Ok(vec![list("distinct values").into()]);
        }
        Ok(vec![
            list("partials").into(),
            Field::new(format_state_name(args.name, "nan"), DataType::UInt64, true).into(),
            Field::new(format_state_name(args.name, "positive infinities"), DataType::UInt64, true).into(),
            Field::new(format_state_name(args.name, "negative infinities"), DataType::UInt64, true).into(),
            Field::new(format_state_name(args.name, "count"), DataType::UInt64, true).into(),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if args.is_distinct {
            Ok(Box::new(DistinctAccumulator { values: BTreeMap::new(), average: self.average }))
        } else {
            Ok(Box::new(ExactAccumulator { sum: ExactTotal::default(), average: self.average }))
        }
    }
}

/// The exact sum of a multiset of doubles: finite values (scaled by 2^-64)
/// as non-overlapping partials in increasing magnitude, special values and
/// the number of values counted.
#[derive(Debug, Default, Clone)]
pub struct ExactTotal {
    partials: Vec<f64>,
    nan: u64,
    positive_infinities: u64,
    negative_infinities: u64,
    count: u64,
}

impl ExactTotal {
    /// Add `x` (`retract`: take it away again; exact, as the value added
    /// before is negated exactly).
    pub fn add(&mut self, x: f64, retract: bool) {
        let step = |n: &mut u64| {
            if retract {
                *n = n.saturating_sub(1)
            } else {
                *n += 1
            }
        };
        step(&mut self.count);
        if x.is_nan() {
            step(&mut self.nan)
        } else if x == f64::INFINITY {
            step(&mut self.positive_infinities)
        } else if x == f64::NEG_INFINITY {
            step(&mut self.negative_infinities)
        } else {
            let scaled = x * SCALE_DOWN;
            self.add_scaled(if retract { -scaled } else { scaled });
        }
    }

    /// Shewchuk's grow-expansion: afterwards the partials still sum exactly
    /// to the previous sum plus `x`, none overlapping, smallest first.
    fn add_scaled(&mut self, mut x: f64) {
        let mut kept = 0;
        for j in 0..self.partials.len() {
            let mut y = self.partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        self.partials.truncate(kept);
        if x != 0.0 {
            self.partials.push(x);
        }
    }

    /// Add another exact total (a partial state).
    fn merge(&mut self, other_partials: impl Iterator<Item = f64>, nan: u64, positive: u64, negative: u64, count: u64) {
        for p in other_partials {
            self.add_scaled(p);
        }
        self.nan += nan;
        self.positive_infinities += positive;
        self.negative_infinities += negative;
        self.count += count;
    }

    /// The correctly rounded exact sum of the scaled finite values (the last
    /// step of CPython's `math.fsum`, with its half-even correction across
    /// partials).
    fn rounded_scaled(&self) -> f64 {
        let p = &self.partials;
        let mut n = p.len();
        if n == 0 {
            return 0.0;
        }
        n -= 1;
        let mut hi = p[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = p[n];
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            let yr = x - hi;
            if y == yr {
                hi = x;
            }
        }
        hi
    }

    /// The sum (or the average) as SQL gives it: NULL without values.
    pub fn value(&self, average: bool) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        if self.nan > 0 || (self.positive_infinities > 0 && self.negative_infinities > 0) {
            return Some(f64::NAN);
        }
        if self.positive_infinities > 0 {
            return Some(f64::INFINITY);
        }
        if self.negative_infinities > 0 {
            return Some(f64::NEG_INFINITY);
        }
        let scaled = self.rounded_scaled();
        Some(if average { scaled / self.count as f64 * SCALE_UP } else { scaled * SCALE_UP })
    }
}

#[derive(Debug)]
struct ExactAccumulator {
    sum: ExactTotal,
    average: bool,
}

fn values(values: &[ArrayRef]) -> Result<&Float64Array> {
    match values.first().and_then(|v| v.as_primitive_opt::<Float64Type>()) {
        Some(v) => Ok(v),
        None => exec_err!("{EXACT_SUM} takes one DOUBLE"),
    }
}

impl Accumulator for ExactAccumulator {
    fn update_batch(&mut self, batch: &[ArrayRef]) -> Result<()> {
        values(batch)?.iter().flatten().for_each(|x| self.sum.add(x, false));
        Ok(())
    }

    fn retract_batch(&mut self, batch: &[ArrayRef]) -> Result<()> {
        values(batch)?.iter().flatten().for_each(|x| self.sum.add(x, true));
        Ok(())
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(self.sum.value(self.average)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.sum.partials.capacity() * 8
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let s = &self.sum;
        let partials = ScalarValue::List(ScalarValue::new_list_nullable(
            &s.partials.iter().map(|p| ScalarValue::Float64(Some(*p))).collect::<Vec<_>>(),
            &DataType::Float64,
        ));
        Ok(vec![
            partials,
            ScalarValue::UInt64(Some(s.nan)),
            ScalarValue::UInt64(Some(s.positive_infinities)),
            ScalarValue::UInt64(Some(s.negative_infinities)),
            ScalarValue::UInt64(Some(s.count)),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [partials, nan, positive, negative, count] = states else {
            return exec_err!("{EXACT_SUM}: a partial state has {} columns, not 5", states.len());
        };
        let partials: &ListArray = partials.as_list();
        let counter = |a: &ArrayRef| a.as_primitive::<UInt64Type>().clone();
        let (nan, positive, negative, count): (UInt64Array, UInt64Array, UInt64Array, UInt64Array) =
            (counter(nan), counter(positive), counter(negative), counter(count));
        for row in 0..partials.len() {
            if partials.is_null(row) {
                continue;
            }
            let list = partials.value(row);
            let list = list.as_primitive::<Float64Type>();
            self.sum.merge(list.iter().flatten(), nan.value(row), positive.value(row), negative.value(row), count.value(row));
        }
        Ok(())
    }
}

/// `SUM(DISTINCT x)` / `AVG(DISTINCT x)`: the distinct values in a sorted
/// map (by their bits, -0.0 as 0.0 and every NaN as one) with the number of
/// rows holding each (so a window frame can retract rows), summed exactly.
#[derive(Debug)]
struct DistinctAccumulator {
    values: BTreeMap<u64, u64>,
    average: bool,
}

fn canonical_bits(x: f64) -> u64 {
    if x.is_nan() {
        f64::NAN.to_bits()
    } else if x == 0.0 {
        0.0f64.to_bits()
    } else {
        x.to_bits()
    }
}

impl Accumulator for DistinctAccumulator {
    fn update_batch(&mut self, batch: &[ArrayRef]) -> Result<()> {
        for x in values(batch)?.iter().flatten() {
            *self.values.entry(canonical_bits(x)).or_default() += 1;
        }
        Ok(())
    }

    fn retract_batch(&mut self, batch: &[ArrayRef]) -> Result<()> {
        for x in values(batch)?.iter().flatten() {
            let bits = canonical_bits(x);
            if let Some(n) = self.values.get_mut(&bits) {
                *n -= 1;
                if *n == 0 {
                    self.values.remove(&bits);
                }
            }
        }
        Ok(())
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let mut total = ExactTotal::default();
        self.values.keys().for_each(|b| total.add(f64::from_bits(*b), false));
        Ok(ScalarValue::Float64(total.value(self.average)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.values.len() * 24
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let values: Vec<ScalarValue> = self.values.keys().map(|b| ScalarValue::Float64(Some(f64::from_bits(*b)))).collect();
        Ok(vec![ScalarValue::List(ScalarValue::new_list_nullable(&values, &DataType::Float64))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(lists) = states.first().and_then(|s| s.as_list_opt::<i32>()) else {
            return exec_err!("{EXACT_SUM}: a distinct partial state is not a list");
        };
        for row in 0..lists.len() {
            if lists.is_valid(row) {
                let list = lists.value(row);
                for x in list.as_primitive::<Float64Type>().iter().flatten() {
                    *self.values.entry(canonical_bits(x)).or_default() += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_in_order(values: &[f64]) -> Option<f64> {
        let mut t = ExactTotal::default();
        values.iter().for_each(|v| t.add(*v, false));
        t.value(false)
    }

    #[test]
    fn the_sum_does_not_depend_on_the_order() {
        let values = [1e308, 0.1, -1e308, 1e-300, 3.0, 0.7, -0.2, 1e16, 1.0, -1e16, 5e-324, 2.5e-310];
        let first = sum_in_order(&values).unwrap();
        // Every rotation and the reverse give the same bits.
        for k in 0..values.len() {
            let mut v = values.to_vec();
            v.rotate_left(k);
            assert_eq!(sum_in_order(&v).unwrap().to_bits(), first.to_bits(), "rotation {k}");
            v.reverse();
            assert_eq!(sum_in_order(&v).unwrap().to_bits(), first.to_bits(), "reversed rotation {k}");
        }
        // Plain addition in these orders does not agree.
        let naive: Vec<f64> = [values.to_vec(), values.iter().rev().copied().collect()].iter().map(|v| v.iter().sum()).collect();
        assert_ne!(naive[0], naive[1]);
    }

    #[test]
    fn sums_are_correctly_rounded_and_do_not_overflow_on_the_way() {
        assert_eq!(sum_in_order(&[1e100, 1.0, -1e100]), Some(1.0));
        assert_eq!(sum_in_order(&[f64::MAX, f64::MAX, -f64::MAX]), Some(f64::MAX));
        assert_eq!(sum_in_order(&[f64::MAX, f64::MAX]), Some(f64::INFINITY));
        assert_eq!(sum_in_order(&[0.1; 10]), Some(1.0));
        assert_eq!(sum_in_order(&[]), None);
        assert!(sum_in_order(&[f64::INFINITY, 1.0, f64::NEG_INFINITY]).unwrap().is_nan());
        assert_eq!(sum_in_order(&[f64::NEG_INFINITY, 1.0]), Some(f64::NEG_INFINITY));
    }

    #[test]
    fn merged_states_and_retracted_rows_give_the_same_value() {
        let values = [0.1, 0.2, 0.3, 1e20, -1e20, 7.25];
        let mut a = ExactAccumulator { sum: ExactTotal::default(), average: true };
        let mut b = ExactAccumulator { sum: ExactTotal::default(), average: true };
        let batch = |v: &[f64]| vec![Arc::new(Float64Array::from(v.to_vec())) as ArrayRef];
        a.update_batch(&batch(&values[..3])).unwrap();
        b.update_batch(&batch(&values[3..])).unwrap();
        let state: Vec<ArrayRef> = b.state().unwrap().iter().map(|s| s.to_array().unwrap()).collect();
        a.merge_batch(&state).unwrap();
        let whole = {
            let mut t = ExactTotal::default();
            values.iter().for_each(|v| t.add(*v, false));
            t.value(true)
        };
        assert_eq!(a.evaluate().unwrap(), ScalarValue::Float64(whole));
        a.retract_batch(&batch(&[1e20, 0.1])).unwrap();
        let rest = sum_in_order(&[0.2, 0.3, -1e20, 7.25]).unwrap() / 4.0;
        assert_eq!(a.evaluate().unwrap(), ScalarValue::Float64(Some(rest)));
    }

    #[test]
    fn any_order_and_any_split_into_partial_states_give_the_same_bits() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let batch = |v: &[f64]| vec![Arc::new(Float64Array::from(v.to_vec())) as ArrayRef];
        for _ in 0..200 {
            let n = rng.gen_range(1..60);
            let mut values: Vec<f64> = (0..n)
                .map(|_| {
                    let mantissa: f64 = rng.gen_range(-1.0..1.0);
                    mantissa * 2f64.powi(rng.gen_range(-1070..1023))
                })
                .collect();
            let expected = sum_in_order(&values).unwrap();
            for _ in 0..5 {
                values.shuffle(&mut rng);
                let cut = rng.gen_range(0..=values.len());
                let mut a = ExactAccumulator { sum: ExactTotal::default(), average: false };
                let mut b = ExactAccumulator { sum: ExactTotal::default(), average: false };
                a.update_batch(&batch(&values[..cut])).unwrap();
                b.update_batch(&batch(&values[cut..])).unwrap();
                let state: Vec<ArrayRef> = a.state().unwrap().iter().map(|s| s.to_array().unwrap()).collect();
                b.merge_batch(&state).unwrap();
                let ScalarValue::Float64(Some(got)) = b.evaluate().unwrap() else { panic!("no value") };
                assert_eq!(got.to_bits(), expected.to_bits(), "{values:?}");
            }
        }
    }

    #[test]
    fn distinct_values_are_summed_once() {
        let mut d = DistinctAccumulator { values: BTreeMap::new(), average: false };
        d.update_batch(&[Arc::new(Float64Array::from(vec![0.1, 0.1, -0.0, 0.0, 0.2])) as ArrayRef]).unwrap();
        assert_eq!(d.evaluate().unwrap(), ScalarValue::Float64(sum_in_order(&[0.1, 0.0, 0.2])));
    }
}
