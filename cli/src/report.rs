//! A study's report: one self-contained HTML file (inline SVG plots drawn
//! with plotters, inline CSS, no script, nothing fetched when it is
//! viewed) with the study's call, each figure with its interval, plots of
//! the figures people look at, and the privacy cost.

use std::fmt::Write;

use anyhow::Context;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use plotters::prelude::*;

/// One column of the study's answer, as numbers (NULL as None).
fn numbers(batches: &[RecordBatch], name: &str) -> anyhow::Result<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for b in batches {
        let column = b.column_by_name(name).with_context(|| format!("the study's answer has no column {name}"))?;
        let column = arrow::compute::cast(column, &DataType::Float64)?;
        let column = column.as_primitive::<Float64Type>();
        out.extend((0..column.len()).map(|i| (!column.is_null(i)).then(|| column.value(i))));
    }
    Ok(out)
}

/// The first row's value of a one-row study's column `name`.
fn first_number(batches: &[RecordBatch], name: &str) -> anyhow::Result<f64> {
    numbers(batches, name)?.first().copied().flatten().with_context(|| format!("no {name} in the answer"))
}

/// Column `index` of the study's answer, as text.
fn texts(batches: &[RecordBatch], index: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        let column = arrow::compute::cast(b.column(index), &DataType::Utf8)?;
        let column = column.as_string::<i32>();
        out.extend((0..column.len()).map(|i| if column.is_null(i) { String::new() } else { column.value(i).to_string() }));
    }
    Ok(out)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn plot_error(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}

/// Bars of `values` (one per label), as an SVG string; `intervals` adds an
/// error bar to each bar that has one.
fn bars(title: &str, y_desc: &str, labels: &[String], values: &[f64], intervals: &[Option<(f64, f64)>], zero_line: bool) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let lows = values.iter().copied().chain(intervals.iter().flatten().map(|i| i.0)).fold(0.0f64, f64::min);
        let highs = values.iter().copied().chain(intervals.iter().flatten().map(|i| i.1)).fold(0.0f64, f64::max);
        let pad = ((highs - lows) * 0.1).max(1e-9);
        let n = labels.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .build_cartesian_2d(-0.5f64..(n - 0.5), (lows - if lows < 0.0 { pad } else { 0.0 })..(highs + pad))
            .map_err(plot_error)?;
        let label_of = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 { labels.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(labels.len() * 2 + 1)
            .x_label_formatter(&label_of)
            .y_desc(y_desc)
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x = i as f64;
                Rectangle::new([(x - 0.3, 0.0), (x + 0.3, *v)], RGBColor(66, 110, 180).mix(0.75).filled())
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(intervals.iter().enumerate().filter_map(|(i, interval)| {
                interval.map(|(low, high)| ErrorBar::new_vertical(i as f64, low, values[i], high, BLACK.stroke_width(2), 14))
            }))
            .map_err(plot_error)?;
        if zero_line {
            chart.draw_series(LineSeries::new(vec![(-0.5, 0.0), (n - 0.5, 0.0)], BLACK.mix(0.6))).map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// The lift study's report. `call` is the study's SQL; `batches` its answer.
pub fn lift(call: &str, party: &str, batches: &[RecordBatch]) -> anyhow::Result<String> {
    let schema = batches.first().map(|b| b.schema()).context("the study answered no rows")?;
    let meta = schema.metadata();
    let group_name = schema.field(0).name().clone();
    let groups = texts(batches, 0)?;
    let people = numbers(batches, "people")?;
    let converters = numbers(batches, "converters")?;
    let rates = numbers(batches, "conversion_rate")?;
    let lift = numbers(batches, "lift")?;
    let (low, high) = (numbers(batches, "lift_ci_low")?, numbers(batches, "lift_ci_high")?);
    let significant = texts(batches, schema.index_of("significant")?)?;
    let value_column = schema.fields().iter().map(|f| f.name().clone()).find(|n| n.ends_with("_per_person"));
    let per_person = match &value_column {
        Some(name) => Some((name.clone(), numbers(batches, name)?)),
        None => None,
    };
    let (charged, left, budget_plot) = budget(party, meta)?;

    // Lift of every group but the control, with its 95 % interval, in %.
    let treated: Vec<usize> = (0..groups.len()).filter(|&i| lift[i].is_some()).collect();
    let lift_plot = bars(
        "Lift over the control group (95 % interval)",
        "lift (%)",
        &treated.iter().map(|&i| groups[i].clone()).collect::<Vec<_>>(),
        &treated.iter().map(|&i| lift[i].unwrap_or(0.0) * 100.0).collect::<Vec<_>>(),
        &treated.iter().map(|&i| low[i].zip(high[i]).map(|(l, h)| (l * 100.0, h * 100.0))).collect::<Vec<_>>(),
        true,
    )?;
    let rate_plot = bars(
        "Conversion rate by group",
        "converters / people (%)",
        &groups,
        &rates.iter().map(|r| r.unwrap_or(0.0) * 100.0).collect::<Vec<_>>(),
        &vec![None; groups.len()],
        false,
    )?;

    let mut rows = String::new();
    for i in 0..groups.len() {
        let fmt = |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "—".into());
        let interval = match (low[i], high[i]) {
            (Some(l), Some(h)) => format!("{:.1} % to {:.1} %", l * 100.0, h * 100.0),
            _ => "—".into(),
        };
        write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&groups[i]),
            fmt(people[i], 0),
            fmt(converters[i], 0),
            fmt(rates[i].map(|r| r * 100.0), 2),
            per_person.as_ref().map(|(_, v)| format!("<td>{}</td>", fmt(v[i], 2))).unwrap_or_default(),
            fmt(lift[i].map(|l| l * 100.0), 1),
            interval,
            match significant[i].as_str() {
                "true" => "yes",
                "false" => "no",
                _ => "—",
            }
        )?;
    }
    let value_header = value_column.as_deref().map(|n| format!("<th>{}</th>", escape(n))).unwrap_or_default();
    let body = format!(
        r#"<p>Did exposure cause extra conversions? People per <b>{group}</b>, converters within the attribution window after their first exposure, and each group's lift over the control group.</p>
{parameters}
<h2>Figures</h2>
<table id="figures"><tr><th>{group}</th><th>people</th><th>converters</th><th>conversion rate (%)</th>{value_header}<th>lift (%)</th><th>95 % interval</th><th>excludes 0</th></tr>{rows}</table>
<p class="note">Every count is differentially private (noise added once, from OpenDP). The interval combines the sampling variance of each rate and the variance of the DP noise (delta method on the log of the rate ratio).</p>
<figure id="lift-plot">{lift_plot}</figure>
<figure id="rate-plot">{rate_plot}</figure>"#,
        group = escape(&group_name),
        parameters = parameters(call, meta),
    );
    Ok(page("Lift study", &body, party, meta, charged, left, &budget_plot))
}

/// The study's parameters as it ran, and as it was asked.
fn parameters(call: &str, meta: &std::collections::HashMap<String, String>) -> String {
    format!(
        r#"<h2>Parameters</h2><code>{}</code><p class="note">Asked as <code style="display:inline">{}</code>; parameters the call left out are the manifest's.</p>"#,
        escape(meta.get("cleanroom.study").map(String::as_str).unwrap_or(call)),
        escape(call)
    )
}

/// A whole report page: its title, body, and the privacy cost.
fn page(title: &str, body: &str, party: &str, meta: &std::collections::HashMap<String, String>, charged: f64, left: f64, budget_plot: &str) -> String {
    let receipt = meta.get("cleanroom.receipt").cloned().unwrap_or_default();
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #bbb; padding: .3em .7em; text-align: right; }}
th {{ background: #eef; }} td:first-child, th:first-child {{ text-align: left; }}
code {{ background: #f4f4f4; padding: .2em; display: block; white-space: pre-wrap; }}
figure {{ margin: 1em 0; }} .note {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>{title}</h1>
{body}
<h2>Privacy cost</h2>
<p>This study cost <b>epsilon {charged}</b> of {party}'s budget (one charge for all its figures; receipt <code style="display:inline">{receipt}</code>); <b>{left}</b> is left.</p>
<figure id="budget-plot">{budget_plot}</figure>
</body></html>
"#,
        party = escape(party),
        receipt = escape(&receipt),
    )
}

/// The budget a study's answer says it cost and left, and its plot.
fn budget(party: &str, meta: &std::collections::HashMap<String, String>) -> anyhow::Result<(f64, f64, String)> {
    let charged: f64 = meta.get("cleanroom.charge.epsilon").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let left: f64 = meta.get("cleanroom.budget.remaining_epsilon").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let plot = bars(&format!("Privacy budget of {party} (epsilon)"), "epsilon", &["this study".to_string(), "left".to_string()], &[charged, left], &[None, None], false)?;
    Ok((charged, left, plot))
}

/// The match-rate study's report.
pub fn match_rate(call: &str, party: &str, batches: &[RecordBatch]) -> anyhow::Result<String> {
    let schema = batches.first().map(|b| b.schema()).context("the study answered no rows")?;
    let meta = schema.metadata();
    let one = |name: &str| first_number(batches, name);
    let first = |index: usize| -> anyhow::Result<String> { texts(batches, index)?.into_iter().next().context("the study answered no rows") };
    let (left_name, right_name) = (first(0)?, first(2)?);
    let labels = vec![format!("{left_name} in {right_name}"), format!("{right_name} in {left_name}")];
    let rates = [one("left_match_rate")?, one("right_match_rate")?];
    let intervals = [
        Some((one("left_match_rate_ci_low")? * 100.0, one("left_match_rate_ci_high")? * 100.0)),
        Some((one("right_match_rate_ci_low")? * 100.0, one("right_match_rate_ci_high")? * 100.0)),
    ];
    let rate_plot = bars("Match rate (95 % interval)", "people found in the other dataset (%)", &labels, &[rates[0] * 100.0, rates[1] * 100.0], &intervals, false)?;
    let (charged, left, budget_plot) = budget(party, meta)?;
    let row = |label: &str, people: f64, rate: f64, interval: Option<(f64, f64)>| {
        let (low, high) = interval.unwrap_or_default();
        format!("<tr><td>{}</td><td>{people:.0}</td><td>{:.2}</td><td>{low:.2} % to {high:.2} %</td></tr>", escape(label), rate * 100.0)
    };
    let body = format!(
        r#"<p>How many people of each party's dataset are in the other's?</p>
{parameters}
<h2>Figures</h2>
<table id="figures"><tr><th>dataset</th><th>people</th><th>match rate (%)</th><th>95 % interval</th></tr>{left_row}{right_row}
<tr><td>in both</td><td>{matched:.0}</td><td></td><td></td></tr></table>
<p class="note">Every count is differentially private (noise added once, from OpenDP); the counts are of all people, so the interval is the DP noise's: (matched ± its 95 % noise half-width) / people, widened for the noise on people.</p>
<figure id="rate-plot">{rate_plot}</figure>"#,
        parameters = parameters(call, meta),
        left_row = row(&left_name, one("left_people")?, rates[0], intervals[0]),
        right_row = row(&right_name, one("right_people")?, rates[1], intervals[1]),
        matched = one("matched")?,
    );
    Ok(page("Match-rate study", &body, party, meta, charged, left, &budget_plot))
}

/// The reach-and-frequency study's report.
pub fn reach(call: &str, party: &str, batches: &[RecordBatch]) -> anyhow::Result<String> {
    let schema = batches.first().map(|b| b.schema()).context("the study answered no rows")?;
    let meta = schema.metadata();
    let one = |name: &str| first_number(batches, name);
    let interval = |name: &str| -> anyhow::Result<Option<(f64, f64)>> { Ok(Some((one(&format!("{name}_ci_low"))?, one(&format!("{name}_ci_high"))?))) };
    let figures: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| !n.ends_with("_ci_low") && !n.ends_with("_ci_high"))
        .collect();
    let plot = |prefix: &str, title: &str, y: &str| -> anyhow::Result<String> {
        let names: Vec<&String> = figures.iter().filter(|n| n.starts_with(prefix)).collect();
        let labels: Vec<String> = names.iter().map(|n| n[prefix.len()..].replace('_', " ")).collect();
        let values = names.iter().map(|n| one(n)).collect::<anyhow::Result<Vec<_>>>()?;
        let intervals = names.iter().map(|n| interval(n)).collect::<anyhow::Result<Vec<_>>>()?;
        bars(title, y, &labels, &values, &intervals, false)
    };
    let reach_plot = plot("reach_", "People reached by channel (95 % interval)", "people")?;
    let frequency_plot = plot("frequency_", "People by number of impressions (95 % interval)", "people")?;
    let overlap_plot = plot("overlap_", "People reached in both channels of a pair", "people")?;
    let (charged, left, budget_plot) = budget(party, meta)?;
    let mut rows = String::new();
    for name in &figures {
        let (low, high) = interval(name)?.unwrap_or_default();
        write!(rows, "<tr><td>{}</td><td>{:.0}</td><td>{low:.0} to {high:.0}</td></tr>", escape(name), one(name)?)?;
    }
    let body = format!(
        r#"<p>How many people did the campaign reach, on which channels, and how often?</p>
{parameters}
<h2>Figures</h2>
<table id="figures"><tr><th>figure</th><th>people</th><th>95 % interval</th></tr>{rows}</table>
<p class="note">Every figure is a differentially private count of people (noise added once, from OpenDP); the counts are of all people, so each interval is the DP noise's.</p>
<figure id="reach-plot">{reach_plot}</figure>
<figure id="frequency-plot">{frequency_plot}</figure>
<figure id="overlap-plot">{overlap_plot}</figure>"#,
        parameters = parameters(call, meta),
    );
    Ok(page("Reach and frequency study", &body, party, meta, charged, left, &budget_plot))
}

/// Intervals of column `name` from its `_ci_low`/`_ci_high` columns.
fn intervals(batches: &[RecordBatch], name: &str) -> anyhow::Result<Vec<Option<(f64, f64)>>> {
    let (low, high) = (numbers(batches, &format!("{name}_ci_low"))?, numbers(batches, &format!("{name}_ci_high"))?);
    Ok(low.into_iter().zip(high).map(|(l, h)| l.zip(h)).collect())
}

/// The attribution study's report: credited conversions, net value and
/// commission per credited key, each with its interval.
pub fn attribution(call: &str, party: &str, batches: &[RecordBatch]) -> anyhow::Result<String> {
    let schema = batches.first().map(|b| b.schema()).context("the study answered no rows")?;
    let meta = schema.metadata();
    let key_name = schema.field(0).name().clone();
    let keys = texts(batches, 0)?;
    let values = |name: &str| -> anyhow::Result<Vec<f64>> { Ok(numbers(batches, name)?.into_iter().map(|v| v.unwrap_or(0.0)).collect()) };
    let conversions = values("conversions")?;
    let conversion_intervals = intervals(batches, "conversions")?;
    let shares = values("share")?;
    // The net value's column follows the credited key's (column 0).
    let net = schema.fields().iter().skip(1).map(|f| f.name().clone()).find(|n| n.starts_with("net_") && !n.ends_with("_ci_low") && !n.ends_with("_ci_high"));
    let has_commission = schema.index_of("commission").is_ok();
    let mut figures = vec![bars(&format!("Credited conversions by {key_name} (95 % interval)"), "conversions", &keys, &conversions, &conversion_intervals, false)?];
    let mut headers = format!("<th>{}</th><th>conversions</th><th>95 % interval</th><th>share (%)</th>", escape(&key_name));
    let mut columns: Vec<(Vec<f64>, Vec<Option<(f64, f64)>>)> = Vec::new();
    if let Some(net) = &net {
        let net_values = values(net)?;
        let net_intervals = intervals(batches, net)?;
        figures.push(bars(&format!("{net} by {key_name} (95 % interval)"), net, &keys, &net_values, &net_intervals, true)?);
        headers.push_str(&format!("<th>{}</th><th>95 % interval</th>", escape(net)));
        columns.push((net_values, net_intervals));
    }
    if has_commission {
        let commission = values("commission")?;
        let commission_intervals = intervals(batches, "commission")?;
        figures.push(bars(&format!("Commission by {key_name} (95 % interval)"), "commission", &keys, &commission, &commission_intervals, true)?);
        headers.push_str("<th>commission</th><th>95 % interval</th>");
        columns.push((commission, commission_intervals));
    }
    let (charged, left, budget_plot) = budget(party, meta)?;
    let span = |i: Option<(f64, f64)>| i.map(|(l, h)| format!("{l:.1} to {h:.1}")).unwrap_or_else(|| "—".into());
    let mut rows = String::new();
    for i in 0..keys.len() {
        write!(rows, "<tr><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.1}</td>", escape(&keys[i]), conversions[i], span(conversion_intervals[i]), shares[i] * 100.0)?;
        for (v, iv) in &columns {
            write!(rows, "<td>{:.2}</td><td>{}</td>", v[i], span(iv[i]))?;
        }
        rows.push_str("</tr>");
    }
    let figures: String = figures.iter().enumerate().map(|(i, svg)| format!(r#"<figure id="attribution-plot-{i}">{svg}</figure>"#)).collect();
    let body = format!(
        r#"<p>Which <b>{key}</b> earned the conversions, and what commission is due on their value net of returns?</p>
{parameters}
<h2>Figures</h2>
<table id="figures"><tr>{headers}</tr>{rows}</table>
<p class="note">Every figure is differentially private (noise added once, from OpenDP). Credit is worked out per person (each outcome credited to touches of the same person in the window before it), capped per person and {key}, then summed; net value and commission are computed from the released sums, and their intervals add the two sums' 95 % noise half-widths (at least 95 %).</p>
{figures}"#,
        key = escape(&key_name),
        parameters = parameters(call, meta),
    );
    Ok(page("Attribution and commission study", &body, party, meta, charged, left, &budget_plot))
}

/// The cohorts study's report: a heatmap of the active share of each
/// first-exposure cohort in each period from it, and the figures.
pub fn cohorts(call: &str, party: &str, batches: &[RecordBatch]) -> anyhow::Result<String> {
    let schema = batches.first().map(|b| b.schema()).context("the study answered no rows")?;
    let meta = schema.metadata();
    let cohorts = texts(batches, 0)?;
    let after: Vec<usize> = numbers(batches, "periods_after")?.into_iter().map(|v| v.unwrap_or(0.0).max(0.0) as usize).collect();
    let rate: Vec<f64> = numbers(batches, "active_rate")?.into_iter().map(|v| v.unwrap_or(0.0)).collect();
    let (people, active) = (numbers(batches, "people")?, numbers(batches, "active")?);
    let active_intervals = intervals(batches, "active")?;
    let mut names: Vec<String> = cohorts.clone();
    names.dedup();
    let periods = after.iter().copied().max().unwrap_or(0) + 1;
    let top = rate.iter().copied().fold(1e-9f64, f64::max);
    let mut heatmap = String::new();
    {
        let height = 120 + 28 * names.len() as u32;
        let root = SVGBackend::with_string(&mut heatmap, (720, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Active share of each cohort, by period after its first exposure", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(100)
            .build_cartesian_2d(0f64..periods as f64, 0f64..names.len() as f64)
            .map_err(plot_error)?;
        let name_of = |y: &f64| {
            let i = (y - 0.5).round();
            if ((y - 0.5) - i).abs() < 1e-6 && i >= 0.0 { names.get(names.len() - 1 - i as usize).cloned().unwrap_or_default() } else { String::new() }
        };
        let period_of = |x: &f64| {
            let i = (x - 0.5).round();
            if ((x - 0.5) - i).abs() < 1e-6 && i >= 0.0 { format!("{i}") } else { String::new() }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(periods * 2 + 1)
            .y_labels(names.len() * 2 + 1)
            .x_label_formatter(&period_of)
            .y_label_formatter(&name_of)
            .x_desc("periods after the first exposure")
            .y_desc("cohort")
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series((0..cohorts.len()).map(|i| {
                let row = names.len() - 1 - names.iter().position(|n| *n == cohorts[i]).unwrap_or(0);
                let shade = (rate[i] / top).clamp(0.0, 1.0);
                let colour = RGBColor((245.0 - 180.0 * shade) as u8, (245.0 - 135.0 * shade) as u8, (250.0 - 70.0 * shade) as u8);
                Rectangle::new([(after[i] as f64, row as f64), (after[i] as f64 + 1.0, row as f64 + 1.0)], colour.filled())
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    let (charged, left, budget_plot) = budget(party, meta)?;
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "—".into());
    let mut rows = String::new();
    for i in 0..cohorts.len() {
        let (low, high) = active_intervals[i].unwrap_or_default();
        write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{low:.0} to {high:.0}</td><td>{:.2}</td></tr>",
            escape(&cohorts[i]),
            after[i],
            fmt(people[i]),
            fmt(active[i]),
            rate[i] * 100.0
        )?;
    }
    let body = format!(
        r#"<p>How do people behave in the periods after they were first reached? People by the period of their first exposure (cohort), and how many of them had an outcome in each period from it.</p>
{parameters}
<figure id="cohort-heatmap">{heatmap}</figure>
<p class="note">Darker is a larger share of the cohort active (at most {top:.2} %). Every count is differentially private (noise added once, from OpenDP); cohorts and periods are keys of public domains, so every cell is released, empty or not; each interval is the DP noise's.</p>
<h2>Figures</h2>
<table id="figures"><tr><th>cohort</th><th>periods after</th><th>people</th><th>active</th><th>95 % interval</th><th>active (%)</th></tr>{rows}</table>"#,
        parameters = parameters(call, meta),
        top = top * 100.0,
    );
    Ok(page("Cohorts study", &body, party, meta, charged, left, &budget_plot))
}
