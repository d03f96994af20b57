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
//! the same value. Grouped aggregation runs [`ExactGroups`], which keeps the
//! same exact total per group (and so gives the same bits as the row
//! accumulator, tested below).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, ListArray, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, UInt64Type};
use datafusion::common::{exec_err, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility};

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

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        !args.is_distinct
    }

    fn create_groups_accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(ExactGroups { totals: Vec::new(), average: self.average, partials_capacity: 0 }))
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

/// The partial states of `totals` as the row accumulator's state columns:
/// the partials as a list, then the NaN, +inf, -inf and value counts.
fn state_columns(totals: &[ExactTotal]) -> Vec<ArrayRef> {
    let mut offsets = Vec::with_capacity(totals.len() + 1);
    offsets.push(0i32);
    let mut flat = Vec::new();
    for t in totals {
        flat.extend_from_slice(&t.partials);
        offsets.push(flat.len() as i32);
    }
    let list = ListArray::new(
        Arc::new(Field::new_list_field(DataType::Float64, true)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(Float64Array::from(flat)),
        None,
    );
    let counter = |f: fn(&ExactTotal) -> u64| Arc::new(totals.iter().map(|t| Some(f(t))).collect::<UInt64Array>()) as ArrayRef;
    vec![
        Arc::new(list),
        counter(|t| t.nan),
        counter(|t| t.positive_infinities),
        counter(|t| t.negative_infinities),
        counter(|t| t.count),
    ]
}

/// Grouped `cleanroom_exact_sum`/`_avg`: one [`ExactTotal`] per group, so
/// each group's value is the same function of its multiset of values as the
/// row accumulator's (whatever the batches, partitions and phases).
#[derive(Debug)]
struct ExactGroups {
    totals: Vec<ExactTotal>,
    average: bool,
    /// The partials' heap capacity over all groups, kept up to date as they
    /// grow (DataFusion asks for the size after every batch).
    partials_capacity: usize,
}

impl ExactGroups {
    fn grow(&mut self, total_num_groups: usize) {
        if self.totals.len() < total_num_groups {
            self.totals.resize_with(total_num_groups, ExactTotal::default);
        }
    }

    fn take(&mut self, emit_to: EmitTo) -> Vec<ExactTotal> {
        let taken = emit_to.take_needed(&mut self.totals);
        self.partials_capacity -= taken.iter().map(|t| t.partials.capacity()).sum::<usize>();
        taken
    }
}

impl GroupsAccumulator for ExactGroups {
    fn update_batch(
        &mut self,
        batch: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let values = values(batch)?;
        self.grow(total_num_groups);
        for (row, &group) in group_indices.iter().enumerate() {
            if values.is_null(row) || opt_filter.is_some_and(|f| !(f.is_valid(row) && f.value(row))) {
                continue;
            }
            let total = &mut self.totals[group];
            let before = total.partials.capacity();
            total.add(values.value(row), false);
            self.partials_capacity += total.partials.capacity() - before;
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let average = self.average;
        Ok(Arc::new(self.take(emit_to).iter().map(|t| t.value(average)).collect::<Float64Array>()))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(state_columns(&self.take(emit_to)))
    }

    fn merge_batch(&mut self, states: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> Result<()> {
        let [partials, nan, positive, negative, count] = states else {
            return exec_err!("{EXACT_SUM}: a partial state has {} columns, not 5", states.len());
        };
        let partials: &ListArray = partials.as_list();
        let Some(items) = partials.values().as_primitive_opt::<Float64Type>() else {
            return exec_err!("{EXACT_SUM}: partial sums are not doubles");
        };
        let offsets = partials.value_offsets();
        let counter = |a: &ArrayRef| a.as_primitive::<UInt64Type>().clone();
        let (nan, positive, negative, count) = (counter(nan), counter(positive), counter(negative), counter(count));
        self.grow(total_num_groups);
        for (row, &group) in group_indices.iter().enumerate() {
            if partials.is_null(row) {
                continue;
            }
            let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
            let total = &mut self.totals[group];
            let before = total.partials.capacity();
            let merged = (start..end).filter(|i| items.is_valid(*i)).map(|i| items.value(i));
            total.merge(merged, nan.value(row), positive.value(row), negative.value(row), count.value(row));
            self.partials_capacity += total.partials.capacity() - before;
        }
        Ok(())
    }

    /// Each row as the state of a group holding only that row's value (none
    /// if it is NULL or filtered out): what merging then adds up is the same
    /// multiset of values.
    fn convert_to_state(&self, batch: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> Result<Vec<ArrayRef>> {
        let values = values(batch)?;
        let totals: Vec<ExactTotal> = (0..values.len())
            .map(|row| {
                let mut total = ExactTotal::default();
                if values.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                    total.add(values.value(row), false);
                }
                total
            })
            .collect();
        Ok(state_columns(&totals))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.totals.capacity() * std::mem::size_of::<ExactTotal>() + self.partials_capacity * 8
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
    fn grouped_sums_give_the_row_accumulators_bits_in_any_split() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for average in [false, true] {
            for _ in 0..50 {
                let groups = rng.gen_range(1..8);
                let n = rng.gen_range(0..200);
                let values: Vec<Option<f64>> = (0..n)
                    .map(|_| match rng.gen_range(0..40) {
                        0 => None,
                        1 => Some(f64::INFINITY),
                        _ => Some(rng.gen_range(-1.0..1.0) * 2f64.powi(rng.gen_range(-60..60))),
                    })
                    .collect();
                let group_of: Vec<usize> = (0..n).map(|_| rng.gen_range(0..groups)).collect();
                let keep: Vec<bool> = (0..n).map(|_| rng.gen_range(0..5) > 0).collect();
                // Expected: the row accumulator over each group's kept values.
                let expected: Vec<Option<f64>> = (0..groups)
                    .map(|g| {
                        let mut t = ExactTotal::default();
                        (0..n).filter(|&i| group_of[i] == g && keep[i]).for_each(|i| {
                            if let Some(x) = values[i] {
                                t.add(x, false)
                            }
                        });
                        t.value(average)
                    })
                    .collect();
                // Two partial accumulators over a split of the rows, merged into a third.
                let cut = rng.gen_range(0..=n);
                let mut merged = ExactGroups { totals: Vec::new(), average, partials_capacity: 0 };
                for (lo, hi) in [(0, cut), (cut, n)] {
                    let mut part = ExactGroups { totals: Vec::new(), average, partials_capacity: 0 };
                    let batch = vec![Arc::new(Float64Array::from(values[lo..hi].to_vec())) as ArrayRef];
                    let filter = BooleanArray::from(keep[lo..hi].to_vec());
                    part.update_batch(&batch, &group_of[lo..hi], Some(&filter), groups).unwrap();
                    let state = part.state(EmitTo::All).unwrap();
                    assert_eq!(part.partials_capacity, 0);
                    merged.merge_batch(&state, &(0..groups).collect::<Vec<_>>(), groups).unwrap();
                }
                let first = merged.evaluate(EmitTo::First(1)).unwrap();
                let rest = merged.evaluate(EmitTo::All).unwrap();
                let got: Vec<Option<f64>> = [first, rest].iter().flat_map(|a| a.as_primitive::<Float64Type>().iter().collect::<Vec<_>>()).collect();
                let bits = |v: &[Option<f64>]| v.iter().map(|x| x.map(f64::to_bits)).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&expected), "average {average}");
                // Rows passed on as states (skipped partial aggregation) merge to the same values.
                let mut converted = ExactGroups { totals: Vec::new(), average, partials_capacity: 0 };
                let all = vec![Arc::new(Float64Array::from(values.clone())) as ArrayRef];
                let state = converted.convert_to_state(&all, Some(&BooleanArray::from(keep.clone()))).unwrap();
                converted.merge_batch(&state, &group_of, groups).unwrap();
                let got = converted.evaluate(EmitTo::All).unwrap();
                assert_eq!(bits(&got.as_primitive::<Float64Type>().iter().collect::<Vec<_>>()), bits(&expected));
                // The grouped state reads back in the row accumulator.
                let mut row = ExactAccumulator { sum: ExactTotal::default(), average };
                let mut one = ExactGroups { totals: Vec::new(), average, partials_capacity: 0 };
                let all = vec![Arc::new(Float64Array::from(values.clone())) as ArrayRef];
                one.update_batch(&all, &vec![0; n], None, 1).unwrap();
                row.merge_batch(&one.state(EmitTo::All).unwrap()).unwrap();
                let whole = {
                    let mut t = ExactTotal::default();
                    values.iter().flatten().for_each(|x| t.add(*x, false));
                    t.value(average)
                };
                assert_eq!(row.evaluate().unwrap(), ScalarValue::Float64(whole));
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
