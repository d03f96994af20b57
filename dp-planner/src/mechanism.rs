//! Noise mechanisms, all from OpenDP.
//!
//! Each noisy column is released through one OpenDP measurement over the
//! vector of all its groups: Laplace with the L1 metric (pure ε-DP) or
//! Gaussian with the L2 metric (ρ-zCDP). The measurement's own privacy map
//! turns the column's sensitivity into the ε or ρ it spends, and the planner
//! checks that figure against the column's share of the query's budget before
//! any noise is drawn. Integers use OpenDP's discrete Laplace / discrete
//! Gaussian; floats use its exact float versions (values rounded to a
//! power-of-two grid, the sampling done on big rationals). Samples come from
//! OpenSSL's CSPRNG (`use-openssl`). Nothing here is hand-written float noise.

use std::collections::HashMap;

use opendp::core::Measurement;
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::combinators::ConcentratedMeasure;
use opendp::measurements::{make_gaussian, make_laplace, make_laplace_threshold, make_noisy_max};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{AbsoluteDistance, L01InfDistance, L1Distance, L2Distance, LInfDistance};

use crate::error::{DpError, Result};

/// A Laplace mechanism for one column: its scale and what it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Laplace {
    /// Noise scale b: the noise has density ∝ exp(-|x| / b).
    pub scale: f64,
    /// L1 sensitivity of the column over all groups.
    pub sensitivity: f64,
    /// ε the release costs, as computed by OpenDP's privacy map.
    pub epsilon: f64,
    /// Integer-valued column: discrete Laplace on integers.
    pub integer: bool,
    /// What one integer step is worth in the column's units (1 unless the
    /// column is a fixed-point sum); `scale` and `sensitivity` are in steps.
    pub unit: f64,
}

/// Largest sensitivity, in steps, an integer mechanism is calibrated for:
/// OpenDP's integer maps take it as an i64, and above 2^62 the noisy values
/// could leave i64.
const MAX_STEPS_SENSITIVITY: f64 = (1u64 << 62) as f64;

/// Exact values are clamped to ±2^62 steps before noise is added. A fixed
/// clamp cannot widen the distance between neighbouring values
/// (|clamp(a) − clamp(b)| ≤ |a − b|), so it keeps the sensitivity.
const MAX_STEPS_VALUE: i128 = 1i128 << 62;

/// ln(1 / 0.05): P(|Laplace(b)| > b·ln 20) = 0.05. For the discrete Laplace,
/// P(|X| > m) = 2e^{-(m+1)/b} / (1 + e^{-1/b}) ≤ e^{-m/b}, so the same
/// half-width covers at least 95 % there too.
const LN_20: f64 = 2.995_732_273_553_991;

impl Laplace {
    /// The mechanism that releases a column of L1 sensitivity `sensitivity`
    /// with at most `epsilon`.
    ///
    /// Why it is private: the Laplace mechanism with scale b on a vector of L1
    /// sensitivity Δ is (Δ/b)-DP; we take b = Δ/ε and let OpenDP's map confirm
    /// it (for floats OpenDP widens Δ to its rounding grid, so b is widened
    /// until the map fits ε).
    pub fn calibrate(sensitivity: f64, epsilon: f64, integer: bool) -> Result<Self> {
        if !(sensitivity.is_finite() && sensitivity >= 0.0 && epsilon.is_finite() && epsilon > 0.0) {
            return Err(DpError::Mechanism(format!(
                "cannot calibrate noise for sensitivity {sensitivity} and epsilon {epsilon}"
            )));
        }
        let sensitivity = if integer { sensitivity.ceil() } else { sensitivity };
        if integer && sensitivity > MAX_STEPS_SENSITIVITY {
            return Err(DpError::Mechanism(format!("a sensitivity of {sensitivity} steps does not fit a 64-bit integer mechanism")));
        }
        let (scale, spent) = fit_scale(sensitivity / epsilon, epsilon, 1.0, |scale| privacy_map(sensitivity, scale, integer))?;
        Ok(Laplace { scale, sensitivity, epsilon: spent, integer, unit: 1.0 })
    }

    /// Standard deviation of the noise, in the column's units.
    pub fn stddev(&self) -> f64 {
        std::f64::consts::SQRT_2 * self.scale * self.unit
    }

    /// Half-width of the 95 % interval around a released value.
    pub fn ci95_half_width(&self) -> f64 {
        LN_20 * self.scale * self.unit
    }

    /// Add noise to every value of the column. Integer columns are rounded
    /// first (they hold whole numbers already).
    pub fn apply(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.integer {
            let exact: Vec<i64> = values.iter().map(|v| v.round() as i64).collect();
            let noisy = integer_laplace(self.scale)?.invoke(&exact).map_err(opendp_error)?;
            Ok(noisy.into_iter().map(|v| v as f64).collect())
        } else {
            float_laplace(self.scale)?.invoke(&values.to_vec()).map_err(opendp_error)
        }
    }
}

/// Start from the textbook `scale` and widen it until OpenDP's privacy `map`
/// (what the mechanism at that scale spends) fits `budget`; returns the scale
/// and what it spends. The spend falls as scale^(−1/`power`) (Laplace and
/// selections: power 1; Gaussian ρ: power ½), so each step jumps to where
/// the map should fit; OpenDP's rounding (float grids) makes a few steps
/// necessary at most.
fn fit_scale(scale: f64, budget: f64, power: f64, map: impl Fn(f64) -> Result<f64>) -> Result<(f64, f64)> {
    let mut scale = scale.max(f64::MIN_POSITIVE);
    for _ in 0..8 {
        let spent = map(scale)?;
        if spent <= budget {
            return Ok((scale, spent));
        }
        scale *= (spent / budget).powf(power) * (1.0 + 1e-12);
    }
    Err(DpError::Mechanism("noise scale did not converge".into()))
}

type VectorLaplace<T> = Measurement<VectorDomain<AtomDomain<T>>, L1Distance<T>, MaxDivergence, Vec<T>>;

fn opendp_error(e: opendp::error::Error) -> DpError {
    DpError::Mechanism(e.to_string())
}

/// OpenDP's discrete Laplace over a vector of integers, L1 metric.
fn integer_laplace(scale: f64) -> Result<VectorLaplace<i64>> {
    make_laplace(VectorDomain::new(AtomDomain::<i64>::default()), L1Distance::<i64>::default(), scale, None)
        .map_err(opendp_error)
}

/// OpenDP's exact float Laplace over a vector of non-NaN floats, L1 metric.
fn float_laplace(scale: f64) -> Result<VectorLaplace<f64>> {
    make_laplace(VectorDomain::new(AtomDomain::<f64>::new_non_nan()), L1Distance::<f64>::default(), scale, None)
        .map_err(opendp_error)
}

/// ε that OpenDP's Laplace measurement spends on inputs `sensitivity` apart.
fn privacy_map(sensitivity: f64, scale: f64, integer: bool) -> Result<f64> {
    if integer {
        integer_laplace(scale)?.map(&(sensitivity as i64)).map_err(opendp_error)
    } else {
        float_laplace(scale)?.map(&sensitivity).map_err(opendp_error)
    }
}

/// What one column may spend: ε (Laplace) or ρ (Gaussian).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Share {
    Epsilon(f64),
    Rho(f64),
}

impl Share {
    /// This share times `factor` (ε and ρ both compose additively).
    pub fn scaled(self, factor: f64) -> Share {
        match self {
            Share::Epsilon(e) => Share::Epsilon(e * factor),
            Share::Rho(r) => Share::Rho(r * factor),
        }
    }

    /// This share split in `parts` equal parts.
    pub fn split(self, parts: f64) -> Share {
        match self {
            Share::Epsilon(e) => Share::Epsilon(e / parts),
            Share::Rho(r) => Share::Rho(r / parts),
        }
    }
}

/// A Gaussian mechanism for one column: its scale and what it costs in zCDP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gaussian {
    /// Noise standard deviation σ (the discrete Gaussian's parameter).
    pub scale: f64,
    /// L2 sensitivity of the column over all groups.
    pub sensitivity: f64,
    /// ρ the release costs, as computed by OpenDP's privacy map.
    pub rho: f64,
    /// Integer-valued column: discrete Gaussian on integers.
    pub integer: bool,
    /// What one integer step is worth in the column's units.
    pub unit: f64,
}

/// z with P(|N(0, 1)| > z) = 0.05.
const Z_975: f64 = 1.959_963_984_540_054;

impl Gaussian {
    /// The mechanism that releases a column of L2 sensitivity `sensitivity`
    /// with at most `rho`.
    ///
    /// Why it is private: the Gaussian mechanism with parameter σ on a vector
    /// of L2 sensitivity Δ is Δ²/(2σ²)-zCDP; we take σ = Δ/√(2ρ) and let
    /// OpenDP's map confirm it (widening σ for floats until it fits).
    pub fn calibrate(sensitivity: f64, rho: f64, integer: bool) -> Result<Self> {
        if !(sensitivity.is_finite() && sensitivity >= 0.0 && rho.is_finite() && rho > 0.0) {
            return Err(DpError::Mechanism(format!("cannot calibrate noise for sensitivity {sensitivity} and rho {rho}")));
        }
        if integer && sensitivity > MAX_STEPS_SENSITIVITY {
            return Err(DpError::Mechanism(format!("a sensitivity of {sensitivity} steps does not fit a 64-bit integer mechanism")));
        }
        // ρ falls with the square of the scale.
        let (scale, spent) = fit_scale(sensitivity / (2.0 * rho).sqrt(), rho, 0.5, |scale| {
            if integer {
                integer_gaussian(scale)?.map(&sensitivity).map_err(opendp_error)
            } else {
                float_gaussian(scale)?.map(&sensitivity).map_err(opendp_error)
            }
        })?;
        Ok(Gaussian { scale, sensitivity, rho: spent, integer, unit: 1.0 })
    }

    /// Half-width of the 95 % interval around a released value. Floats: the
    /// normal quantile (OpenDP's float Gaussian is a discrete Gaussian on a
    /// grid far finer than σ). Integers: the discrete Gaussian is
    /// sub-Gaussian with parameter σ (Canonne–Kamath–Steinke 2020), so
    /// P(|X| > t) ≤ 2·exp(−t²/2σ²) = 0.05 at t = σ·√(2 ln 40).
    pub fn ci95_half_width(&self) -> f64 {
        self.unit * if self.integer { self.scale * (2.0 * 40f64.ln()).sqrt() } else { Z_975 * self.scale }
    }

    pub fn apply(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.integer {
            let exact: Vec<i64> = values.iter().map(|v| v.round() as i64).collect();
            let noisy = integer_gaussian(self.scale)?.invoke(&exact).map_err(opendp_error)?;
            Ok(noisy.into_iter().map(|v| v as f64).collect())
        } else {
            float_gaussian(self.scale)?.invoke(&values.to_vec()).map_err(opendp_error)
        }
    }
}

/// What releases one DP aggregate column, calibrated once at planning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mechanism {
    /// A noisy count or sum (in steps of its grid).
    Total(Noise),
    /// `AVG`: a noisy sum and a noisy count, half of the column's share each.
    Average { sum: Noise, count: Noise },
    /// A variance: noisy sum, count and sum of squares, a third each.
    Variance { sum: Noise, count: Noise, squares: Noise },
    /// A quantile: the noisy max over candidates, per group.
    Quantile(NoisyMin),
}

impl Mechanism {
    /// The noise announced for the column, when it is one noisy total.
    pub fn total(&self) -> Option<&Noise> {
        match self {
            Mechanism::Total(noise) => Some(noise),
            _ => None,
        }
    }
}

/// The noise of one column: Laplace or Gaussian.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Noise {
    Laplace(Laplace),
    Gaussian(Gaussian),
}

impl Noise {
    /// The column's mechanism for its `share`, from its L1 sensitivity (for
    /// Laplace) or L2 sensitivity (for Gaussian).
    pub fn calibrate(share: Share, l1: f64, l2: f64, integer: bool) -> Result<Self> {
        match share {
            Share::Epsilon(e) => Ok(Noise::Laplace(Laplace::calibrate(l1, e, integer)?)),
            Share::Rho(r) => Ok(Noise::Gaussian(Gaussian::calibrate(l2, r, integer)?)),
        }
    }

    /// The integer mechanism of a column whose exact values are whole
    /// numbers of steps worth `unit` each, with sensitivities `l1`, `l2` in
    /// steps; what it reports (stddev, interval, scale, sensitivity) is in
    /// the column's units.
    pub fn calibrate_steps(share: Share, l1: f64, l2: f64, unit: f64) -> Result<Self> {
        Ok(match Noise::calibrate(share, l1, l2, true)? {
            Noise::Laplace(l) => Noise::Laplace(Laplace { unit, ..l }),
            Noise::Gaussian(g) => Noise::Gaussian(Gaussian { unit, ..g }),
        })
    }

    /// Add noise to exact values counted in steps (see
    /// [`Noise::calibrate_steps`]); the noisy values are in steps too.
    /// Values beyond ±2^62 steps are clamped there first.
    pub fn apply_steps(&self, values: &[i128]) -> Result<Vec<i64>> {
        let exact: Vec<i64> = values.iter().map(|v| (*v).clamp(-MAX_STEPS_VALUE, MAX_STEPS_VALUE) as i64).collect();
        match self {
            Noise::Laplace(l) if l.integer => integer_laplace(l.scale)?.invoke(&exact).map_err(opendp_error),
            Noise::Gaussian(g) if g.integer => integer_gaussian(g.scale)?.invoke(&exact).map_err(opendp_error),
            _ => Err(DpError::Mechanism("a float mechanism cannot noise whole steps".into())),
        }
    }

    /// What one step is worth in the column's units.
    pub fn unit(&self) -> f64 {
        match self {
            Noise::Laplace(l) => l.unit,
            Noise::Gaussian(g) => g.unit,
        }
    }

    pub fn stddev(&self) -> f64 {
        match self {
            Noise::Laplace(l) => l.stddev(),
            Noise::Gaussian(g) => g.scale * g.unit,
        }
    }

    pub fn ci95_half_width(&self) -> f64 {
        match self {
            Noise::Laplace(l) => l.ci95_half_width(),
            Noise::Gaussian(g) => g.ci95_half_width(),
        }
    }

    pub fn apply(&self, values: &[f64]) -> Result<Vec<f64>> {
        match self {
            Noise::Laplace(l) => l.apply(values),
            Noise::Gaussian(g) => g.apply(values),
        }
    }

    pub fn integer(&self) -> bool {
        match self {
            Noise::Laplace(l) => l.integer,
            Noise::Gaussian(g) => g.integer,
        }
    }

    /// The mechanism's name in answer metadata.
    pub fn name(&self) -> &'static str {
        match (self, self.integer()) {
            (Noise::Laplace(_), true) => "discrete_laplace",
            (Noise::Laplace(_), false) => "laplace",
            (Noise::Gaussian(_), true) => "discrete_gaussian",
            (Noise::Gaussian(_), false) => "gaussian",
        }
    }

    /// What the column spends, as (metadata key suffix, value): ε or ρ.
    pub fn cost(&self) -> (&'static str, f64) {
        match self {
            Noise::Laplace(l) => ("epsilon", l.epsilon),
            Noise::Gaussian(g) => ("rho", g.rho),
        }
    }

    /// The sensitivity the noise is calibrated to, and its norm.
    pub fn sensitivity(&self) -> (&'static str, f64) {
        match self {
            Noise::Laplace(l) => ("L1", l.sensitivity * l.unit),
            Noise::Gaussian(g) => ("L2", g.sensitivity * g.unit),
        }
    }

    pub fn scale(&self) -> f64 {
        match self {
            Noise::Laplace(l) => l.scale * l.unit,
            Noise::Gaussian(g) => g.scale * g.unit,
        }
    }
}

/// The ε of a ρ-zCDP release at δ, by OpenDP's zCDP → (ε, δ) conversion.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> Result<f64> {
    if rho == 0.0 {
        return Ok(0.0);
    }
    ZeroConcentratedDivergence::convert(rho)
        .and_then(|profile| profile.epsilon(delta))
        .map_err(opendp_error)
}

/// The largest ρ whose (ε, δ) conversion fits `epsilon` at `delta` (bisection
/// on OpenDP's conversion, which grows with ρ).
pub fn rho_for(epsilon: f64, delta: f64) -> Result<f64> {
    if !(epsilon.is_finite() && epsilon > 0.0 && delta > 0.0 && delta < 1.0) {
        return Err(DpError::Mechanism(format!("cannot convert epsilon {epsilon} at delta {delta} to rho")));
    }
    let (mut low, mut high) = (0.0f64, epsilon);
    while zcdp_epsilon(high, delta)? <= epsilon {
        high *= 2.0;
    }
    for _ in 0..100 {
        let mid = (low + high) / 2.0;
        if zcdp_epsilon(mid, delta)? <= epsilon {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

type VectorGaussian<T> = Measurement<VectorDomain<AtomDomain<T>>, L2Distance<f64>, ZeroConcentratedDivergence, Vec<T>>;

/// OpenDP's discrete Gaussian over a vector of integers, L2 metric.
fn integer_gaussian(scale: f64) -> Result<VectorGaussian<i64>> {
    make_gaussian(VectorDomain::new(AtomDomain::<i64>::default()), L2Distance::<f64>::default(), scale, None)
        .map_err(opendp_error)
}

/// OpenDP's exact float Gaussian over a vector of non-NaN floats, L2 metric.
fn float_gaussian(scale: f64) -> Result<VectorGaussian<f64>> {
    make_gaussian(VectorDomain::new(AtomDomain::<f64>::new_non_nan()), L2Distance::<f64>::default(), scale, None)
        .map_err(opendp_error)
}

/// The selection for one group's quantile: the index of the candidate with
/// the lowest score, chosen by OpenDP's noisy max (`negate`; exponential
/// noise, i.e. permute-and-flip, at least as accurate as the exponential
/// mechanism).
///
/// Why it is private: the scores are |den·C_i − num·N| over candidates c_i,
/// where C_i counts a group's values ≤ c_i and N all its values, each
/// person's share of both clamped to `max_contributions_per_group` = m. One
/// person moves every C_i and N by at most m in the same direction, so each
/// score by at most den·m: the score vector's L∞ sensitivity. OpenDP's
/// noisy-max map turns that into the ε it spends (scale ≈ 2·den·m/ε, the
/// scores not being monotonic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoisyMin {
    pub scale: f64,
    /// L∞ sensitivity of the score vector.
    pub sensitivity: i64,
    pub epsilon: f64,
}

type ScoreSelection = Measurement<VectorDomain<AtomDomain<i64>>, LInfDistance<i64>, MaxDivergence, usize>;

fn noisy_min(scale: f64) -> Result<ScoreSelection> {
    make_noisy_max(
        VectorDomain::new(AtomDomain::<i64>::default()),
        LInfDistance::<i64>::new(false),
        MaxDivergence,
        scale,
        true,
    )
    .map_err(opendp_error)
}

impl NoisyMin {
    pub fn calibrate(sensitivity: i64, epsilon: f64) -> Result<Self> {
        if !(sensitivity >= 0 && epsilon.is_finite() && epsilon > 0.0) {
            return Err(DpError::Mechanism(format!("cannot calibrate a selection for sensitivity {sensitivity} and epsilon {epsilon}")));
        }
        let (scale, spent) = fit_scale(2.0 * sensitivity as f64 / epsilon, epsilon, 1.0, |scale| {
            noisy_min(scale)?.map(&sensitivity).map_err(opendp_error)
        })?;
        Ok(NoisyMin { scale, sensitivity, epsilon: spent })
    }

    /// The index of a (noisily) lowest score.
    pub fn select(&self, scores: &[i64]) -> Result<usize> {
        Ok(self.select_each(std::iter::once(scores.to_vec()))?[0])
    }

    /// [`Self::select`] for each score vector (one measurement for all).
    pub fn select_each(&self, scores: impl IntoIterator<Item = Vec<i64>>) -> Result<Vec<usize>> {
        let measurement = noisy_min(self.scale)?;
        scores.into_iter().map(|s| measurement.invoke(&s).map_err(opendp_error)).collect()
    }
}

/// DP partition selection: which group keys (of those present in the data)
/// are released, decided by τ-thresholding a noisy count of the people in
/// each group, with OpenDP's `make_laplace_threshold`.
///
/// Why it is private: after contribution bounding a person is in at most
/// `k = max_groups_contributed` groups and adds 1 to each one's people
/// count, so neighbouring datasets are (ℓ0, ℓ1, ℓ∞) = (k, k, 1) apart. With
/// discrete Laplace noise of scale k/ε on every present group's count, the
/// counts of groups both datasets have are ε-DP (Laplace on ℓ1 = k); a group
/// only one dataset has (its count is at most 1 there) is released only if
/// 1 + Z ≥ τ, which has probability δ₁ = P(Z ≥ τ − 1); over its k groups
/// δ = 1 − (1 − δ₁)^k. OpenDP's privacy map computes exactly this, with one
/// catch, opendp#2922 (open): its function keeps counts *equal* to the
/// threshold, but its map's tail excludes that value, so it under-reports δ
/// by P(Z = τ − 1). We therefore release with a measurement of threshold τ
/// and charge the δ that OpenDP's map reports for threshold τ − 1, whose
/// excluded tail is P(Z > τ − 2) = P(Z ≥ τ − 1): the true δ₁ (the discrete
/// Laplace lives on integers, and the counts are integers). The release
/// keeps only the set of keys; the noisy counts are discarded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// Discrete Laplace scale of the noisy people counts.
    pub scale: f64,
    /// A key is released when its noisy people count is at least this.
    pub threshold: i64,
    /// Groups one person can reach (ℓ0 of the counts).
    pub max_groups: u32,
    /// ε and δ the selection costs.
    pub epsilon: f64,
    pub delta: f64,
}

type ThresholdMeasurement = Measurement<
    MapDomain<AtomDomain<u64>, AtomDomain<i64>>,
    L01InfDistance<AbsoluteDistance<i64>>,
    Approximate<MaxDivergence>,
    HashMap<u64, i64>,
>;

/// Largest threshold searched: beyond it no realistic group is released.
const MAX_THRESHOLD: i64 = 1 << 40;

impl Threshold {
    /// The selection for people counts where a person reaches `max_groups`
    /// groups, spending at most `epsilon` and `delta`: scale k/ε, and the
    /// smallest τ whose true δ (see above) fits `delta`.
    pub fn calibrate(max_groups: u32, epsilon: f64, delta: f64) -> Result<Self> {
        if !(max_groups > 0 && epsilon.is_finite() && epsilon > 0.0 && delta > 0.0 && delta < 1.0) {
            return Err(DpError::Mechanism(format!(
                "cannot calibrate partition selection for {max_groups} groups, epsilon {epsilon}, delta {delta}"
            )));
        }
        let k = max_groups as i64;
        let d_in = (max_groups, k, 1i64);
        let cost = |scale: f64, threshold: i64| -> Result<(f64, f64)> {
            threshold_measurement(scale, threshold)?.map(&d_in).map_err(opendp_error)
        };
        let (scale, spent) = fit_scale(k as f64 / epsilon, epsilon, 1.0, |scale| Ok(cost(scale, MAX_THRESHOLD)?.0))?;
        // δ charged for releasing at τ: OpenDP's map at τ − 1 (opendp#2922).
        let charged = |tau: i64| -> Result<f64> { Ok(cost(scale, tau - 1)?.1) };
        // The smallest τ ≥ 2 (τ − 1 must cover ℓ∞ = 1) with charged(τ) ≤ δ:
        // double, then bisect (δ falls as τ grows).
        let mut high = 2i64;
        while charged(high)? > delta {
            if high >= MAX_THRESHOLD {
                return Err(DpError::Mechanism(format!("delta = {delta} is too small for partition selection")));
            }
            high *= 2;
        }
        let mut low = high / 2; // charged(low) > δ, or low < 2
        while high - low > 1 {
            let mid = low + (high - low) / 2;
            if mid >= 2 && charged(mid)? <= delta {
                high = mid;
            } else {
                low = mid;
            }
        }
        Ok(Threshold { scale, threshold: high, max_groups, epsilon: spent, delta: charged(high)? })
    }

    /// The keys of `counts` (key → exact people count) whose noisy count
    /// reaches the threshold.
    pub fn select(&self, counts: HashMap<u64, i64>) -> Result<Vec<u64>> {
        let kept = threshold_measurement(self.scale, self.threshold)?.invoke(&counts).map_err(opendp_error)?;
        let mut keys: Vec<u64> = kept.into_keys().collect();
        keys.sort_unstable();
        Ok(keys)
    }

    /// What OpenDP's own map reports for releasing at τ (the figure
    /// opendp#2922 shows to be too small; kept for tests and EXPLAIN).
    pub fn opendp_reported_delta(&self) -> Result<f64> {
        let k = self.max_groups as i64;
        Ok(threshold_measurement(self.scale, self.threshold)?.map(&(self.max_groups, k, 1)).map_err(opendp_error)?.1)
    }
}

fn threshold_measurement(scale: f64, threshold: i64) -> Result<ThresholdMeasurement> {
    make_laplace_threshold(
        MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default()),
        L01InfDistance::<AbsoluteDistance<i64>>::default(),
        scale,
        threshold,
        None,
    )
    .map_err(opendp_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_mechanism_spends_no_more_than_its_epsilon() {
        for (s, e, int) in [(1.0, 1.0, true), (10.0, 0.1, true), (500.0, 0.3, false), (3.5, 2.0, false)] {
            let m = Laplace::calibrate(s, e, int).unwrap();
            assert!(m.epsilon <= e, "{m:?}");
            assert!((m.scale - s.ceil().max(s) / e).abs() / m.scale < 1e-6 || !int);
        }
    }

    /// Kolmogorov–Smirnov critical value at significance `alpha` for `n`
    /// samples (asymptotic; conservative for discrete distributions).
    fn ks_critical(n: usize, alpha: f64) -> f64 {
        (-(alpha / 2.0).ln() / 2.0).sqrt() / (n as f64).sqrt()
    }

    #[test]
    fn float_noise_follows_the_laplace_distribution() {
        // KS test at significance 1e-6 against Laplace(0, b).
        let m = Laplace::calibrate(3.0, 0.7, false).unwrap();
        let b = m.scale;
        let mut x = m.apply(&vec![0.0; 20_000]).unwrap();
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let cdf = |v: f64| if v < 0.0 { 0.5 * (v / b).exp() } else { 1.0 - 0.5 * (-v / b).exp() };
        let n = x.len() as f64;
        let d = x
            .iter()
            .enumerate()
            .map(|(i, v)| ((i + 1) as f64 / n - cdf(*v)).max(cdf(*v) - i as f64 / n))
            .fold(0.0, f64::max);
        assert!(d < ks_critical(x.len(), 1e-6), "KS statistic {d}");
    }

    #[test]
    fn integer_noise_follows_the_discrete_laplace_distribution() {
        // KS test at significance 1e-6 against the discrete Laplace with
        // P(k) ∝ p^|k|, p = exp(-1/b): F(x) = p^|x| / (1 + p) for x < 0 and
        // 1 - p^(x+1) / (1 + p) for x >= 0.
        let m = Laplace::calibrate(4.0, 0.5, true).unwrap();
        let p = (-1.0 / m.scale).exp();
        let mut x = m.apply(&vec![0.0; 20_000]).unwrap();
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let cdf = |v: f64| if v < 0.0 { p.powf(-v) / (1.0 + p) } else { 1.0 - p.powf(v + 1.0) / (1.0 + p) };
        let n = x.len() as f64;
        let mut d: f64 = 0.0;
        let mut i = 0;
        while i < x.len() {
            let v = x[i];
            let below = i as f64 / n; // empirical P(X < v)
            while i < x.len() && x[i] == v {
                i += 1;
            }
            let upto = i as f64 / n; // empirical P(X <= v)
            d = d.max((upto - cdf(v)).abs()).max((below - cdf(v - 1.0)).abs());
        }
        assert!(d < ks_critical(x.len(), 1e-6), "KS statistic {d}");
    }

    #[test]
    fn partition_selection_charges_the_delta_at_the_threshold() {
        let t = Threshold::calibrate(3, 0.5, 1e-7).unwrap();
        assert!(t.epsilon <= 0.5 && t.delta <= 1e-7, "{t:?}");
        // opendp#2922: OpenDP's own figure leaves out P(Z = τ − 1).
        assert!(t.opendp_reported_delta().unwrap() < t.delta, "{t:?}");
        // τ is the smallest threshold that fits: one lower would cost more.
        let lower = Threshold { threshold: t.threshold - 1, ..t };
        let charged_lower = threshold_measurement(t.scale, lower.threshold - 1).unwrap().map(&(3, 3, 1)).unwrap().1;
        assert!(charged_lower > 1e-7, "{t:?}");
        // δ₁ = P(Z ≥ τ − 1) = p^(τ−1) / (1 + p) for the discrete Laplace with
        // p = e^(−1/b), and δ = 1 − (1 − δ₁)^3.
        let p = (-1.0 / t.scale).exp();
        let single = p.powi(t.threshold as i32 - 1) / (1.0 + p);
        let exact = 1.0 - (1.0 - single).powi(3);
        assert!((t.delta - exact).abs() <= 1e-3 * exact, "charged {} exact {exact}", t.delta);
    }

    #[test]
    fn partition_selection_keeps_a_key_with_the_claimed_probability() {
        // A key whose count is τ − 2 is kept when Z ≥ 2: probability
        // p² / (1 + p). 20 000 independent keys; the count of kept keys is
        // binomial, and must lie within 5 standard deviations of its mean.
        let t = Threshold::calibrate(1, 1.0, 1e-6).unwrap();
        let n = 20_000u64;
        let counts: HashMap<u64, i64> = (0..n).map(|k| (k, t.threshold - 2)).collect();
        let kept = t.select(counts).unwrap().len() as f64;
        let p = (-1.0 / t.scale).exp();
        let q = p * p / (1.0 + p);
        let (mean, sd) = (n as f64 * q, (n as f64 * q * (1.0 - q)).sqrt());
        assert!((kept - mean).abs() < 5.0 * sd, "kept {kept}, expected {mean} ± {sd}");
        // Far above the threshold every key is kept.
        let big: HashMap<u64, i64> = (0..100).map(|k| (k, t.threshold + 100)).collect();
        assert_eq!(t.select(big).unwrap(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn gaussian_noise_follows_the_normal_distribution_with_its_scale() {
        // KS test at significance 1e-6 against N(0, σ²) for the float
        // Gaussian, and against the normal CDF with a continuity correction
        // for the discrete Gaussian with a large σ (where the two agree to
        // far below the KS critical value).
        let erf_cdf = |v: f64, sigma: f64| 0.5 * (1.0 + erf(v / (sigma * std::f64::consts::SQRT_2)));
        for integer in [false, true] {
            let g = Gaussian::calibrate(3.0, 0.05, integer).unwrap();
            assert!(g.rho <= 0.05, "{g:?}");
            let mut x = g.apply(&vec![0.0; 20_000]).unwrap();
            x.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let n = x.len() as f64;
            let shift = if integer { 0.5 } else { 0.0 };
            let d = x
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let c = erf_cdf(v + shift, g.scale);
                    let below = if integer { erf_cdf(v - shift, g.scale) } else { c };
                    ((i + 1) as f64 / n - c).max(below - i as f64 / n)
                })
                .fold(0.0, f64::max);
            assert!(d < ks_critical(x.len(), 1e-6), "integer {integer}: KS statistic {d}");
            let var = x.iter().map(|v| v * v).sum::<f64>() / n;
            assert!((var.sqrt() / g.scale - 1.0).abs() < 0.05, "sd {} scale {}", var.sqrt(), g.scale);
        }
    }

    /// Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7), for the test's normal CDF.
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let y = 1.0
            - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t + 0.254_829_592)
                * t
                * (-x * x).exp();
        if x >= 0.0 { y } else { -y }
    }

    #[test]
    fn zcdp_converts_to_epsilon_delta_no_looser_than_the_classic_bound() {
        // Bun & Steinke: ρ-zCDP ⇒ (ρ + 2√(ρ ln(1/δ)), δ)-DP; OpenDP's
        // conversion is at least as tight, and rho_for inverts it.
        for (rho, delta) in [(0.01, 1e-7), (0.5, 1e-6), (2.0, 1e-9)] {
            let e = zcdp_epsilon(rho, delta).unwrap();
            let classic = rho + 2.0 * (rho * (1.0f64 / delta).ln()).sqrt();
            assert!(e <= classic + 1e-9 && e > rho, "rho {rho} delta {delta}: {e} vs {classic}");
            let back = rho_for(e, delta).unwrap();
            assert!((back - rho).abs() / rho < 1e-6, "{back} vs {rho}");
        }
    }

    #[test]
    fn noisy_min_prefers_low_scores_with_the_exponential_mechanism_odds() {
        // Two candidates with scores 0 and Δ: OpenDP's noisy max with
        // exponential noise is permute-and-flip, which picks the worse one
        // with probability ½·e^(−Δ/b) (it comes first half the time and is
        // then kept with probability e^(−Δ/b)); b = 2Δ/ε. 20 000 draws,
        // within 5 standard deviations.
        let m = NoisyMin::calibrate(3, 1.0).unwrap();
        assert!(m.epsilon <= 1.0 && (m.scale - 6.0).abs() < 1e-9, "{m:?}");
        let n = 20_000;
        let worse = (0..n).filter(|_| m.select(&[0, 3]).unwrap() == 1).count() as f64;
        let p = 0.5 * (-3.0 / m.scale).exp();
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        assert!((worse - mean).abs() < 5.0 * sd, "picked the worse candidate {worse} times, expected {mean} ± {sd}");
    }

    #[test]
    fn noise_has_the_laplace_scale() {
        // Mean absolute deviation of Laplace(b) is b; with 20 000 draws the
        // sample mean of |X| is within 5 % of b except with negligible probability
        // (its standard error is b/√20000 ≈ 0.7 % of b).
        let m = Laplace::calibrate(1.0, 0.5, false).unwrap();
        let noisy = m.apply(&vec![0.0; 20_000]).unwrap();
        let mad = noisy.iter().map(|v| v.abs()).sum::<f64>() / noisy.len() as f64;
        assert!((mad / m.scale - 1.0).abs() < 0.05, "mad {mad} scale {}", m.scale);
    }
}
