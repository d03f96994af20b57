//! Limits on the shape of a statement, checked on its syntax tree before it
//! is planned.
//!
//! Planning and optimising walk a plan recursively, so a statement nested
//! deeply enough (`SELECT 1 + 1 + … ` with thousands of terms, a long `OR`
//! chain, thousands of `UNION ALL` or joins) would overflow a thread's stack
//! and abort the whole server, for every party. These limits are far above
//! what people and BI tools write, and they are a function of the SQL text
//! only, so a refusal says nothing about any data.

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Expr, Query, SetExpr, Visit, Visitor};

use crate::error::{DpError, Result, Rule};

/// Longest statement text accepted, in bytes.
pub const MAX_STATEMENT_BYTES: usize = 1 << 20;
/// Deepest nesting of expressions (each operator, function call, CASE or
/// parenthesis is one level).
pub const MAX_EXPRESSION_DEPTH: usize = 128;
/// Deepest nesting of queries (subqueries, CTEs, derived tables).
pub const MAX_QUERY_DEPTH: usize = 32;
/// Most `UNION`/`INTERSECT`/`EXCEPT` terms in one query, and most joined
/// tables in one `FROM`.
pub const MAX_SET_TERMS: usize = 64;
pub const MAX_JOINS: usize = 64;
/// Most tables a CTE reads once the CTEs it reads are expanded (a chain of
/// CTEs that each read the previous one twice doubles at every step).
pub const MAX_EXPANDED_TABLES: usize = 256;

/// Refuse a statement text longer than [`MAX_STATEMENT_BYTES`].
pub fn check_text(sql: &str) -> Result<()> {
    if sql.len() > MAX_STATEMENT_BYTES {
        return Err(DpError::refused_with(
            Rule::StatementSize,
            format!("the statement is {} bytes long, above the limit of {MAX_STATEMENT_BYTES}", sql.len()),
            "a shorter statement (a CTE instead of repeated subqueries)",
        ));
    }
    Ok(())
}

/// Refuse a parsed statement nested beyond the limits above. The walk stops
/// at the first limit passed, so it never recurses deeper than they allow.
pub fn check_statement(statement: &DfStatement) -> Result<()> {
    match statement {
        DfStatement::Statement(s) => {
            let mut shape = Shape::default();
            match s.visit(&mut shape) {
                ControlFlow::Break(e) => Err(e),
                ControlFlow::Continue(()) => Ok(()),
            }
        }
        DfStatement::Explain(explain) => check_statement(&explain.statement),
        // COPY, CREATE EXTERNAL TABLE and the like: refused before planning.
        _ => Err(DpError::refused_with(
            Rule::ReadOnly,
            "parties can only run queries; data changes go through the dataset owner's upload",
            "SELECT … GROUP BY …",
        )),
    }
}

/// The tables a query's CTEs read, each CTE counted with the tables of the
/// CTEs it reads (in definition order: a CTE reads only earlier ones).
fn expanded_tables(query: &Query) -> usize {
    let Some(with) = &query.with else { return 0 };
    let mut sizes: Vec<(String, usize)> = Vec::new();
    let mut largest = 0;
    for cte in &with.cte_tables {
        let mut names = Relations::default();
        let _ = cte.query.visit(&mut names);
        let size = names.0.iter().fold(0usize, |n, r| {
            let expanded = sizes.iter().rev().find(|(name, _)| name == r).map(|(_, s)| *s).unwrap_or(1);
            n.saturating_add(expanded)
        });
        largest = largest.max(size);
        sizes.push((cte.alias.name.value.to_ascii_lowercase(), size));
    }
    largest
}

/// Names of the relations a query reads (last part, lower case).
#[derive(Default)]
struct Relations(Vec<String>);

impl Visitor for Relations {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &datafusion::sql::sqlparser::ast::ObjectName) -> ControlFlow<()> {
        if let Some(last) = relation.0.last() {
            self.0.push(last.to_string().trim_matches('"').to_ascii_lowercase());
        }
        ControlFlow::Continue(())
    }
}

#[derive(Default)]
struct Shape {
    expressions: usize,
    queries: usize,
}

fn too_deep(what: &str, limit: usize, instead: &str) -> DpError {
    DpError::refused_with(Rule::StatementShape, format!("the statement nests {what} deeper than {limit} levels"), instead)
}

/// Terms of a chain of set operations (`a UNION ALL b UNION ALL c` is one
/// left-deep chain), counted up to just past `limit`.
fn set_terms(body: &SetExpr, limit: usize) -> usize {
    let mut count = 0;
    let mut stack = vec![body];
    while let Some(node) = stack.pop() {
        if count > limit {
            break;
        }
        match node {
            SetExpr::SetOperation { left, right, .. } => {
                stack.push(left);
                stack.push(right);
            }
            _ => count += 1,
        }
    }
    count
}

impl Visitor for Shape {
    type Break = DpError;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<DpError> {
        self.queries += 1;
        if self.queries > MAX_QUERY_DEPTH {
            return ControlFlow::Break(too_deep("subqueries", MAX_QUERY_DEPTH, "CTEs (WITH …) side by side"));
        }
        if query.with.as_ref().is_some_and(|w| w.cte_tables.len() > MAX_JOINS) || expanded_tables(query) > MAX_EXPANDED_TABLES {
            return ControlFlow::Break(DpError::refused_with(
                Rule::StatementShape,
                format!("the statement's CTEs read more than {MAX_EXPANDED_TABLES} tables once expanded, or there are more than {MAX_JOINS} of them"),
                "fewer CTEs, each read fewer times",
            ));
        }
        if set_terms(&query.body, MAX_SET_TERMS) > MAX_SET_TERMS {
            return ControlFlow::Break(DpError::refused_with(
                Rule::StatementShape,
                format!("a query combines more than {MAX_SET_TERMS} UNION/INTERSECT/EXCEPT terms"),
                "fewer terms, or a dataset that holds the rows together",
            ));
        }
        if let SetExpr::Select(select) = query.body.as_ref() {
            if select.from.iter().map(|f| f.joins.len() + 1).sum::<usize>() > MAX_JOINS {
                return ControlFlow::Break(DpError::refused_with(
                    Rule::StatementShape,
                    format!("a query joins more than {MAX_JOINS} tables"),
                    "fewer joins",
                ));
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<DpError> {
        self.queries -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<DpError> {
        self.expressions += 1;
        if self.expressions > MAX_EXPRESSION_DEPTH {
            return ControlFlow::Break(too_deep(
                "expressions",
                MAX_EXPRESSION_DEPTH,
                "a shorter expression (x IN (a, b, …) instead of a chain of ORs)",
            ));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<DpError> {
        self.expressions -= 1;
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn check(sql: &str) -> Result<()> {
        check_text(sql)?;
        let mut statements = DFParser::parse_sql(sql).map_err(DpError::Plan)?;
        check_statement(&statements.pop_front().unwrap())
    }

    #[test]
    fn long_operator_chains_are_refused_without_overflowing_the_stack() {
        let sum = format!("SELECT {}", vec!["1"; 2000].join(" + "));
        assert!(matches!(check(&sum), Err(DpError::Refused { rule: Rule::StatementShape, .. })));
        let or = format!("SELECT 1 WHERE {}", vec!["a = 1"; 20_000].join(" OR "));
        assert!(matches!(check(&or), Err(DpError::Refused { rule: Rule::StatementShape, .. })));
    }

    #[test]
    fn long_unions_and_joins_are_refused() {
        let union = vec!["SELECT 1"; 500].join(" UNION ALL ");
        assert!(matches!(check(&union), Err(DpError::Refused { rule: Rule::StatementShape, .. })));
        let joins = format!("SELECT 1 FROM t0 {}", (1..200).map(|i| format!("JOIN t{i} USING (uid)")).collect::<Vec<_>>().join(" "));
        assert!(matches!(check(&joins), Err(DpError::Refused { rule: Rule::StatementShape, .. })));
    }

    #[test]
    fn ctes_that_double_at_each_step_are_refused() {
        let mut sql = String::from("WITH c0 AS (SELECT uid FROM t)");
        for i in 1..20 {
            sql.push_str(&format!(", c{i} AS (SELECT uid FROM c{} UNION ALL SELECT uid FROM c{})", i - 1, i - 1));
        }
        sql.push_str(" SELECT COUNT(*) FROM c19");
        assert!(matches!(check(&sql), Err(DpError::Refused { rule: Rule::StatementShape, .. })));
        assert!(matches!(check("COPY (SELECT 1) TO '/tmp/x.csv'"), Err(DpError::Refused { rule: Rule::ReadOnly, .. })));
    }

    #[test]
    fn ordinary_statements_pass() {
        check("SELECT channel, COUNT(*) FROM t WHERE a IN (1, 2, 3) AND (b > 1 OR c < 2) GROUP BY channel").unwrap();
        assert!(matches!(check(&"x".repeat(MAX_STATEMENT_BYTES + 1)), Err(DpError::Refused { rule: Rule::StatementSize, .. })));
    }
}
