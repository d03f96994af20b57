//! The accountant of one query: how its (ε, δ) is split between its noisy
//! columns and its partition selection, and what it is charged.
//!
//! ## Composition argument
//!
//! A query releases `m` noisy columns (an `AVG` counts as one, itself a
//! noisy sum and a noisy count with half of the column's share each) and,
//! when a group key has no public domain, one DP partition selection.
//!
//! - **Laplace** (`noise = 'laplace'`, the default): ε is split evenly over
//!   the `m` columns and the selection; column `j` is ε_j-DP by OpenDP's
//!   Laplace map, the selection (ε_s, δ_s)-DP by OpenDP's threshold map
//!   (corrected for opendp#2922, see [`crate::mechanism::Threshold`]).
//!   Sequential composition: the query is (Σ ε_j + ε_s, δ_s)-DP, at most the
//!   query's (ε, δ).
//! - **Gaussian** (`noise = 'gaussian'`): the selection, if any, takes the
//!   same ε share as above and half of δ; the columns share the rest,
//!   (ε_g, δ_g). They are composed in zCDP, where composition is additive in
//!   ρ and tighter than adding ε: the largest ρ whose (ε, δ) conversion
//!   (OpenDP's, at least as tight as ρ + 2√(ρ ln 1/δ)) is at most ε_g at δ_g
//!   is split evenly, ρ_j = ρ/m; column `j` is ρ_j-zCDP by OpenDP's Gaussian
//!   map with its L2 sensitivity (a person reaches k groups, each by at most
//!   the per-group bound, so √k × that bound), the columns together
//!   ρ-zCDP, hence (ε_g, δ_g)-DP. With the selection, the query is
//!   (ε_s + ε_g, δ_s + δ_g)-DP by sequential composition.
//!
//! Either way the query is charged its (ε, δ) — ε as asked, δ as used — and
//! [`crate::ledger`] composes the charges of all queries.

use crate::error::{DpError, Result};
use crate::mechanism::{rho_for, Share};
use crate::options::{NoiseKind, ResolvedOptions};

/// One query's budget, split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// What each noisy column may spend.
    pub column: Share,
    /// ε and δ the partition selection may spend, when there is one.
    pub selection: Option<(f64, f64)>,
    /// δ the Gaussian columns spend (0 for Laplace).
    pub gaussian_delta: f64,
}

/// Split `options`' ε and δ over `columns` noisy columns and, if `select`, a
/// partition selection.
pub fn split(options: &ResolvedOptions, columns: usize, select: bool) -> Result<Split> {
    let parts = (columns + usize::from(select)) as f64;
    let selection_epsilon = options.epsilon / parts;
    match options.noise {
        NoiseKind::Laplace => Ok(Split {
            column: Share::Epsilon(options.epsilon / parts),
            selection: select.then_some((selection_epsilon, options.delta)),
            gaussian_delta: 0.0,
        }),
        NoiseKind::Gaussian => {
            if options.delta <= 0.0 {
                return Err(DpError::refused_with(
                    "gaussian_delta",
                    "Gaussian noise is (epsilon, delta)-DP and needs delta > 0 (the query has delta = 0)",
                    "OPTIONS (noise = 'gaussian', delta = 1e-7), or Laplace noise (the default)",
                ));
            }
            let (epsilon, delta) = if select {
                (options.epsilon - selection_epsilon, options.delta / 2.0)
            } else {
                (options.epsilon, options.delta)
            };
            let rho = rho_for(epsilon, delta)?;
            Ok(Split {
                column: Share::Rho(rho / columns as f64),
                selection: select.then_some((selection_epsilon, options.delta / 2.0)),
                gaussian_delta: delta,
            })
        }
    }
}
