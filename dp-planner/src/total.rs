//! Total evaluation: below the DP aggregate, no value can make a query fail.
//!
//! Whether a query succeeds must never depend on the data (a failure that
//! only one person's row triggers would be an exact one-bit answer about
//! that person, whatever the noise). A list of functions checked by reading
//! one DataFusion version's source does not survive an upgrade, so totality
//! is made by construction instead: [`make_fallible_total`] replaces, in the
//! plan that runs on protected rows,
//!
//! - every scalar function call `f(a, …)` by `total_f(a, …)`
//!   ([`TotalFunction`]), and
//! - every operator that computes a value (`+ - * / % ||`, bitwise and
//!   regular-expression operators, `~~`) by `total_<op>(a, b)`
//!   ([`TotalOperator`]), and
//! - every cast that can fail even as `TRY_CAST` (from or to times and
//!   dates) by `total_cast(x)` ([`TotalCast`]),
//!
//! which evaluate the original on the whole batch and, only if that fails
//! (an error or a panic), again row by row, with NULL for each row that
//! fails. A failing row therefore yields NULL, exactly as a `TRY_CAST` does,
//! and the outcome of a row depends on that row's values only. Comparisons,
//! `AND`/`OR`, `CASE`, `IN`, `IS NULL` and `TRY_CAST` cannot fail on a value
//! and are left as they are (so join keys, filters pushed into scans and
//! statistics pruning work unchanged). The wrappers keep the original's
//! column name (`sqrt(x)`, `a + b`), so the plan's schema does not change.
//!
//! Ballista ships plans by function name: every process that executes plans
//! registers [`total_versions`] of its functions next to [`all_operators`].
//! A process that lacks them fails every such plan at planning, whatever the
//! data — never silently runs the fallible original.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Field, FieldRef, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{exec_err, DFSchema, Result as DfResult, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, TryCast, Volatility,
};
use datafusion::physical_expr::expressions::{BinaryExpr as PhysicalBinary, Column, Literal};
use datafusion::physical_expr::PhysicalExpr;

/// Name prefix of the total form of a function or operator.
pub const TOTAL_PREFIX: &str = "total_";

/// Operators whose evaluation cannot fail on a value (given the types the
/// analyzer coerced): left as they are.
fn operator_is_total(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::And
            | Operator::Or
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}

/// The operators [`TotalOperator`] wraps, by the name of their total form.
const WRAPPED_OPERATORS: &[(Operator, &str)] = &[
    (Operator::Plus, "plus"),
    (Operator::Minus, "minus"),
    (Operator::Multiply, "multiply"),
    (Operator::Divide, "divide"),
    (Operator::Modulo, "modulo"),
    (Operator::StringConcat, "concat_op"),
    (Operator::BitwiseAnd, "bitwise_and"),
    (Operator::BitwiseOr, "bitwise_or"),
    (Operator::BitwiseXor, "bitwise_xor"),
    (Operator::BitwiseShiftLeft, "bitwise_shift_left"),
    (Operator::BitwiseShiftRight, "bitwise_shift_right"),
    (Operator::RegexMatch, "regex_match"),
    (Operator::RegexIMatch, "regex_imatch"),
    (Operator::RegexNotMatch, "regex_not_match"),
    (Operator::RegexNotIMatch, "regex_not_imatch"),
    (Operator::LikeMatch, "like_match"),
    (Operator::ILikeMatch, "ilike_match"),
    (Operator::NotLikeMatch, "not_like_match"),
    (Operator::NotILikeMatch, "not_ilike_match"),
];

/// The total form of every operator that can fail; executors register them.
pub fn all_operators() -> Vec<Arc<ScalarUDF>> {
    let mut all: Vec<Arc<ScalarUDF>> =
        WRAPPED_OPERATORS.iter().map(|(op, _)| Arc::new(ScalarUDF::new_from_impl(TotalOperator::new(*op)))).collect();
    all.push(Arc::new(ScalarUDF::new_from_impl(TotalCast::new())));
    all
}

/// The total form of each of `functions` (those not total already).
pub fn total_versions(functions: &[Arc<ScalarUDF>]) -> Vec<Arc<ScalarUDF>> {
    functions
        .iter()
        .filter(|f| !is_total(f))
        .map(|f| Arc::new(ScalarUDF::new_from_impl(TotalFunction::new(f.clone()))))
        .collect()
}

fn is_total(f: &ScalarUDF) -> bool {
    f.inner().is::<TotalFunction>() || f.inner().is::<TotalOperator>() || f.inner().is::<TotalCast>()
}

/// Replace every function call, operator and cast that can fail, anywhere
/// in `plan` (which runs on protected rows), by its total form.
///
/// Each total form also carries the type the analysed plan gave the
/// original (as a last, literal argument), and always returns that type: a
/// function whose type DataFusion would compute differently once the
/// optimizer has folded a literal can then never meet an operator that was
/// coerced for the other type (a failure only rows would reach). Column
/// names are kept: a changed expression is aliased to its original name.
pub fn make_fallible_total(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    Ok(plan
        .transform_up(|node| {
            let schema = input_schema(&node)?;
            let names_matter = matches!(node, LogicalPlan::Projection(_) | LogicalPlan::Aggregate(_) | LogicalPlan::Window(_));
            let node = node.map_expressions(|e| {
                let name = e.schema_name().to_string();
                let total = e.transform_down(|e| total_expr(e, &schema))?;
                if names_matter && total.transformed && total.data.schema_name().to_string() != name {
                    Ok(Transformed::yes(total.data.alias(name)))
                } else {
                    Ok(total)
                }
            })?;
            // Names are unchanged, nullability may widen, also of nodes
            // that only pass their input's columns on: recompute every schema.
            Ok(Transformed::yes(node.data.recompute_schema()?))
        })?
        .data)
}

/// The schema the expressions of `node` are evaluated against: its inputs'.
fn input_schema(node: &LogicalPlan) -> DfResult<DFSchema> {
    match node {
        // A join's conditions see both sides.
        LogicalPlan::Join(join) => join.left.schema().join(join.right.schema()),
        // Other nodes with several inputs (UNION) have no expressions.
        _ => Ok(node.inputs().first().map(|i| i.schema().as_ref().clone()).unwrap_or_else(DFSchema::empty)),
    }
}

/// Casts that cannot fail as `TRY_CAST`: between numbers, booleans, text
/// and decimals (a value that does not fit becomes NULL). Casts from or to
/// times and dates can fail on a value even as `TRY_CAST`.
fn cast_is_total(from: &DataType, to: &DataType) -> bool {
    let plain = |t: &DataType| {
        t.is_integer()
            || t.is_floating()
            || matches!(t, DataType::Boolean | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Decimal128(..) | DataType::Null)
    };
    from == to || (plain(from) && plain(to))
}

fn type_literal(t: &DataType) -> Expr {
    Expr::Literal(ScalarValue::Utf8(Some(t.to_string())), None)
}

fn total_expr(e: Expr, schema: &DFSchema) -> DfResult<Transformed<Expr>> {
    let declared = |e: &Expr| e.get_type(schema);
    match e {
        // COALESCE only runs once the optimizer has made it a CASE (its own
        // evaluation always fails); made one here, it needs no total form.
        Expr::ScalarFunction(ScalarFunction { ref func, .. }) if func.name() == "coalesce" => {
            let Expr::ScalarFunction(ScalarFunction { args, .. }) = e else { unreachable!() };
            let when_then = args.into_iter().map(|a| (Box::new(a.clone().is_not_null()), Box::new(a))).collect();
            Ok(Transformed::yes(Expr::Case(datafusion::logical_expr::Case::new(None, when_then, None))))
        }
        Expr::ScalarFunction(ScalarFunction { ref func, ref args }) if !is_total(func) && !args.is_empty() => {
            let t = declared(&e)?;
            let Expr::ScalarFunction(ScalarFunction { func, mut args }) = e else { unreachable!() };
            args.push(type_literal(&t));
            let total = ScalarUDF::new_from_impl(TotalFunction::new(func));
            Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(total), args))))
        }
        Expr::BinaryExpr(BinaryExpr { op, .. }) if !operator_is_total(op) => {
            if !WRAPPED_OPERATORS.iter().any(|(o, _)| *o == op) {
                return datafusion::common::plan_err!("the operator {op} is not supported below the DP aggregate");
            }
            let t = declared(&e)?;
            let Expr::BinaryExpr(BinaryExpr { left, right, .. }) = e else { unreachable!() };
            let total = ScalarUDF::new_from_impl(TotalOperator::new(op));
            Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(total), vec![*left, *right, type_literal(&t)]))))
        }
        Expr::TryCast(TryCast { ref expr, ref field }) | Expr::Cast(datafusion::logical_expr::Cast { ref expr, ref field })
            if !cast_is_total(&declared(expr)?, field.data_type()) =>
        {
            let to = field.data_type().clone();
            let (Expr::TryCast(TryCast { expr, .. }) | Expr::Cast(datafusion::logical_expr::Cast { expr, .. })) = e else { unreachable!() };
            let total = ScalarUDF::new_from_impl(TotalCast::new());
            Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(total), vec![*expr, type_literal(&to)]))))
        }
        other => Ok(Transformed::no(other)),
    }
}

/// The declared output type: the last argument, a type name literal.
fn declared_type(args: &ReturnFieldArgs, name: &str) -> DfResult<DataType> {
    match args.scalar_arguments.last() {
        Some(Some(ScalarValue::Utf8(Some(t)))) => t.parse::<DataType>().map_err(Into::into),
        _ => exec_err!("{name} needs its output type as a last, literal argument"),
    }
}

/// The declared output type, and `args` without the last one (that type).
fn split_declared(args: ScalarFunctionArgs) -> (DataType, ScalarFunctionArgs) {
    let declared = args.return_field.data_type().clone();
    let n = args.args.len().saturating_sub(1);
    let (values, fields) = (args.args[..n].to_vec(), args.arg_fields[..n].to_vec());
    (declared, ScalarFunctionArgs { args: values, arg_fields: fields, ..args })
}

/// `value` as `to` (a no-op when it already is), NULL where it does not convert.
fn as_declared(value: ColumnarValue, to: &DataType) -> DfResult<ColumnarValue> {
    if &value.data_type() == to {
        return Ok(value);
    }
    let options = arrow::compute::CastOptions { safe: true, ..Default::default() };
    value.cast_to(to, Some(&options))
}

/// `total_<f>(…, '<type>')`: the scalar function `f`, with NULL for each
/// row on which `f` fails (errors or panics), always of the declared type.
///
/// Why it is private: whether a row's result is a value or NULL depends on
/// that row's arguments only, so the function stays a row-by-row map and
/// never fails the query; the tracking invariant (a row depends on its own
/// person's rows only) and the totality of the query are kept.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TotalFunction {
    inner: Arc<ScalarUDF>,
    name: String,
    signature: Signature,
}

impl TotalFunction {
    pub fn new(inner: Arc<ScalarUDF>) -> Self {
        let name = format!("{TOTAL_PREFIX}{}", inner.name());
        // The arguments were coerced for the original already; take them as
        // they are.
        let signature = Signature::variadic_any(inner.signature().volatility);
        TotalFunction { inner, name, signature }
    }
}

impl ScalarUDFImpl for TotalFunction {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.schema_name(&args[..args.len().saturating_sub(1)])
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        exec_err!("{} has its type from its last argument", self.name)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        Ok(Arc::new(Field::new(self.name(), declared_type(&args, &self.name)?, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let (declared, args) = split_declared(args);
        evaluate_totally(args, &declared, |args| {
            let scalars: Vec<Option<ScalarValue>> = args
                .args
                .iter()
                .map(|a| match a {
                    ColumnarValue::Scalar(s) => Some(s.clone()),
                    ColumnarValue::Array(_) => None,
                })
                .collect();
            let scalar_refs: Vec<Option<&ScalarValue>> = scalars.iter().map(Option::as_ref).collect();
            let return_field =
                self.inner.return_field_from_args(ReturnFieldArgs { arg_fields: &args.arg_fields, scalar_arguments: &scalar_refs })?;
            let value = self.inner.invoke_with_args(ScalarFunctionArgs { return_field, ..args })?;
            as_declared(value, &declared)
        })
    }
}

/// `total_<op>(a, b, '<type>')`: `a <op> b` evaluated as DataFusion
/// evaluates it, with NULL for each row on which it fails (an out-of-range
/// timestamp, a decimal overflow, a division by zero, an invalid regular
/// expression…), always of the declared type.
///
/// Why it is private: as for [`TotalFunction`], a row's result depends on
/// that row's operands only.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TotalOperator {
    op: Operator,
    name: String,
    signature: Signature,
}

impl TotalOperator {
    pub fn new(op: Operator) -> Self {
        let short = WRAPPED_OPERATORS.iter().find(|(o, _)| *o == op).map(|(_, n)| *n).unwrap_or("operator");
        TotalOperator { op, name: format!("{TOTAL_PREFIX}{short}"), signature: Signature::any(3, Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for TotalOperator {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        match args {
            [left, right, ..] => Ok(format!("{} {} {}", left.schema_name(), self.op, right.schema_name())),
            _ => exec_err!("{} takes two operands", self.name),
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        exec_err!("{} has its type from its last argument", self.name)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        Ok(Arc::new(Field::new(self.name(), declared_type(&args, &self.name)?, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let (declared, args) = split_declared(args);
        evaluate_totally(args, &declared, |args| {
            let rows = args.number_rows;
            let mut fields = Vec::new();
            let mut arrays = Vec::new();
            let mut operand = |v: &ColumnarValue, f: &FieldRef| -> Arc<dyn PhysicalExpr> {
                match v {
                    ColumnarValue::Scalar(s) => Arc::new(Literal::new(s.clone())),
                    ColumnarValue::Array(a) => {
                        let at = arrays.len();
                        fields.push(Field::new(format!("o{at}"), f.data_type().clone(), true));
                        arrays.push(a.clone());
                        Arc::new(Column::new(&format!("o{at}"), at))
                    }
                }
            };
            let (Some(l), Some(r), Some(lf), Some(rf)) =
                (args.args.first(), args.args.get(1), args.arg_fields.first(), args.arg_fields.get(1))
            else {
                return exec_err!("{} takes two operands", self.name);
            };
            let left = operand(l, lf);
            let right = operand(r, rf);
            let batch = RecordBatch::try_new_with_options(
                Arc::new(Schema::new(fields)),
                arrays,
                &RecordBatchOptions::new().with_row_count(Some(rows)),
            )?;
            as_declared(PhysicalBinary::new(left, self.op, right).evaluate(&batch)?, &declared)
        })
    }
}

/// `total_cast(x, '<type>')`: `TRY_CAST(x AS <type>)`, with NULL for each
/// row the cast kernel fails on even in its safe mode (a timestamp outside
/// the range of dates, say).
///
/// Why it is private: as for [`TotalFunction`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TotalCast {
    signature: Signature,
}

impl TotalCast {
    pub fn new() -> Self {
        TotalCast { signature: Signature::any(2, Volatility::Immutable) }
    }
}

impl Default for TotalCast {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for TotalCast {
    fn name(&self) -> &str {
        "total_cast"
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        // A cast keeps its operand's name.
        match args.first() {
            Some(e) => Ok(e.schema_name().to_string()),
            None => exec_err!("total_cast takes a value"),
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        exec_err!("total_cast has its type from its last argument")
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        Ok(Arc::new(Field::new(self.name(), declared_type(&args, "total_cast")?, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let (declared, args) = split_declared(args);
        evaluate_totally(args, &declared, |args| match args.args.first() {
            Some(v) => as_declared(v.clone(), &declared),
            None => exec_err!("total_cast takes a value"),
        })
    }
}

/// Longest string or binary value a total form takes: a row with a longer
/// argument gives NULL. Together with the functions allowed (none grows its
/// output by more than a fixed factor of its input), no value can make a
/// function allocate without bound, however deeply calls are nested.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// For each row, whether a string or binary argument is longer than
/// [`MAX_VALUE_BYTES`]; `None` when no row is (checked from the buffers'
/// total size first, so ordinary batches cost nothing).
fn oversized_rows(args: &[ColumnarValue], rows: usize) -> Option<Vec<bool>> {
    use arrow::array::AsArray;
    let mut oversized: Option<Vec<bool>> = None;
    let mut mark = |lengths: &mut dyn Iterator<Item = usize>| {
        let marks = oversized.get_or_insert_with(|| vec![false; rows]);
        for (row, len) in lengths.enumerate() {
            if row < rows && len > MAX_VALUE_BYTES {
                marks[row] = true;
            }
        }
    };
    for arg in args {
        let ColumnarValue::Array(a) = arg else { continue };
        match a.data_type() {
            DataType::Utf8 if a.as_string::<i32>().value_data().len() > MAX_VALUE_BYTES => {
                let s = a.as_string::<i32>();
                mark(&mut (0..s.len()).map(|i| s.value_length(i) as usize));
            }
            DataType::LargeUtf8 if a.as_string::<i64>().value_data().len() > MAX_VALUE_BYTES => {
                let s = a.as_string::<i64>();
                mark(&mut (0..s.len()).map(|i| s.value_length(i) as usize));
            }
            DataType::Binary if a.as_binary::<i32>().value_data().len() > MAX_VALUE_BYTES => {
                let b = a.as_binary::<i32>();
                mark(&mut (0..b.len()).map(|i| b.value_length(i) as usize));
            }
            DataType::LargeBinary if a.as_binary::<i64>().value_data().len() > MAX_VALUE_BYTES => {
                let b = a.as_binary::<i64>();
                mark(&mut (0..b.len()).map(|i| b.value_length(i) as usize));
            }
            DataType::Utf8View => {
                let s = a.as_string_view();
                mark(&mut s.views().iter().map(|v| *v as u32 as usize));
            }
            DataType::BinaryView => {
                let b = a.as_binary_view();
                mark(&mut b.views().iter().map(|v| *v as u32 as usize));
            }
            _ => {}
        }
    }
    oversized.filter(|marks| marks.iter().any(|m| *m))
}

/// Evaluate `f` on the batch; if it fails, on each row alone, with NULL for
/// the rows that fail. Panics count as failures; a row with an argument
/// longer than [`MAX_VALUE_BYTES`] is NULL without being evaluated.
fn evaluate_totally(
    args: ScalarFunctionArgs,
    return_type: &DataType,
    f: impl Fn(ScalarFunctionArgs) -> DfResult<ColumnarValue>,
) -> DfResult<ColumnarValue> {
    let return_type = return_type.clone();
    let attempt = |args: ScalarFunctionArgs| -> Option<ColumnarValue> {
        match catch_unwind(AssertUnwindSafe(|| f(args))) {
            Ok(Ok(v)) if v.data_type() == return_type => Some(v),
            _ => None,
        }
    };
    let oversized = oversized_rows(&args.args, args.number_rows);
    if oversized.is_none() {
        if let Some(v) = attempt(args.clone()) {
            return Ok(v);
        }
    }
    let all_scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
    if all_scalar {
        return Ok(ColumnarValue::Scalar(ScalarValue::try_from(&return_type)?));
    }
    let rows = args.number_rows;
    let mut pieces: Vec<ArrayRef> = Vec::with_capacity(rows);
    for row in 0..rows {
        let one = ScalarFunctionArgs {
            args: args
                .args
                .iter()
                .map(|a| match a {
                    ColumnarValue::Array(array) => ColumnarValue::Array(array.slice(row, 1)),
                    scalar => scalar.clone(),
                })
                .collect(),
            number_rows: 1,
            ..args.clone()
        };
        let too_long = oversized.as_ref().is_some_and(|marks| marks[row]);
        let value = if too_long { None } else { attempt(one).and_then(|v| v.into_array(1).ok()).filter(|a| a.len() == 1) };
        pieces.push(value.unwrap_or_else(|| new_null_array(&return_type, 1)));
    }
    let refs: Vec<&dyn Array> = pieces.iter().map(|a| a.as_ref()).collect();
    if refs.is_empty() {
        return Ok(ColumnarValue::Array(new_null_array(&return_type, 0)));
    }
    Ok(ColumnarValue::Array(arrow::compute::concat(&refs)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int8Array, TimestampMicrosecondArray};
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    async fn run(sql_expr: Expr, batch: RecordBatch) -> ArrayRef {
        let ctx = SessionContext::new();
        let df = ctx.read_batch(batch).unwrap().select(vec![sql_expr.alias("v")]).unwrap();
        let plan = df.logical_plan().clone();
        let plan = datafusion::optimizer::Analyzer::new()
            .execute_and_check(plan, &datafusion::config::ConfigOptions::default(), |_, _| {})
            .unwrap();
        let plan = make_fallible_total(plan).unwrap();
        let batches = ctx.execute_logical_plan(plan).await.unwrap().collect().await.unwrap();
        batches[0].column(0).clone()
    }

    #[tokio::test]
    async fn sqrt_of_a_negative_is_null_not_an_error() {
        let batch = RecordBatch::try_from_iter([("x", Arc::new(Float64Array::from(vec![4.0, -1.0, 9.0])) as ArrayRef)]).unwrap();
        let sqrt = datafusion::functions::math::sqrt();
        let out = run(sqrt.call(vec![col("x")]), batch).await;
        let out = out.as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(out.iter().collect::<Vec<_>>(), vec![Some(2.0), None, Some(3.0)]);
    }

    #[tokio::test]
    async fn abs_of_the_minimum_integer_is_null() {
        let batch = RecordBatch::try_from_iter([("x", Arc::new(Int8Array::from(vec![-128, -3])) as ArrayRef)]).unwrap();
        let abs = datafusion::functions::math::abs();
        let out = run(abs.call(vec![col("x")]), batch).await;
        let out = out.as_any().downcast_ref::<Int8Array>().unwrap();
        assert_eq!(out.iter().collect::<Vec<_>>(), vec![None, Some(3)]);
    }

    #[tokio::test]
    async fn timestamp_plus_interval_out_of_range_is_null() {
        let ts = TimestampMicrosecondArray::from(vec![i64::MAX - 10, 0]);
        let batch = RecordBatch::try_from_iter([("t", Arc::new(ts) as ArrayRef)]).unwrap();
        let interval = lit(ScalarValue::IntervalYearMonth(Some(12)));
        let out = run(col("t") + interval, batch).await;
        assert!(out.is_null(0));
        assert!(!out.is_null(1));
    }

    #[tokio::test]
    async fn integer_division_by_zero_is_null() {
        let batch = RecordBatch::try_from_iter([
            ("a", Arc::new(arrow::array::Int64Array::from(vec![6, 6])) as ArrayRef),
            ("b", Arc::new(arrow::array::Int64Array::from(vec![0, 3])) as ArrayRef),
        ])
        .unwrap();
        let out = run(col("a") / col("b"), batch).await;
        let out = out.as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
        assert_eq!(out.iter().collect::<Vec<_>>(), vec![None, Some(2)]);
    }
}
