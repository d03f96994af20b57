//! The seed verticals of `cleanroom generate --vertical`: demo collaborations
//! of an iGaming operator and its affiliates, a Forex broker and its
//! introducing brokers, and an e-commerce merchant and its publishers.
//!
//! Each is drawn from the AdBench population model (the same people, their
//! activity, the test/hold-out assignment with its built-in lift, outcomes
//! that follow touches) and then written in the vertical's own terms: its
//! tables, columns, parties and value scales. The mapping is a pure function
//! of the AdBench parts, so a vertical too is a pure function of
//! `(scale_factor, seed)`. Each comes with a manifest whose `[studies.*]`
//! tables set the studies an operator of that vertical runs, and with the
//! exact answers of those studies (`truth.json`).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

use crate::generate::{
    attribution_truth_sql, credentials_toml, generate_adbench, is_generated_part, lift_truth_sql, match_rate_truth_sql, part_name, password_hash,
    temp_name, truth_json, write_atomically, GenerateOptions, GenerateSummary, PartWriter, DEMO_COLLABORATION_KEY,
};

/// A demo collaboration `cleanroom generate` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Vertical {
    /// An ad network's impressions and an advertiser's conversions (the AdBench workload).
    #[default]
    Adbench,
    /// An affiliate network's player referrals and an operator's deposits and GGR.
    Igaming,
    /// Introducing brokers' trader referrals and a broker's trades in lots.
    Forex,
    /// Publishers' affiliate clicks and a merchant's orders and returns.
    Ecommerce,
}

/// How a vertical names and scales the AdBench population.
struct Profile {
    name: &'static str,
    about: &'static str,
    /// Table, owner, the SQL that makes it from one AdBench part (over
    /// `impressions` or `conversions`), and its `[datasets.columns]` (for
    /// the outcomes, those after `uid` and `ts`).
    touches: (&'static str, &'static str, String, String),
    outcomes: (&'static str, &'static str, &'static str, &'static str),
    /// What the attribution study's defaults do, and its commission rate.
    attribution_about: &'static str,
    commission_rate: f64,
    /// The attribution study's defaults, also for its exact answer: the
    /// credited column, the value, the returns flag, the bounds of a
    /// person's value per key (the manifest's `value_cap`, and its negative
    /// for a value that can be negative).
    credit: &'static str,
    value: &'static str,
    returns: &'static str,
    value_cap: (f64, f64),
    /// The lift study's value and its cap per person.
    lift_value: &'static str,
    lift_cap: f64,
}

/// The touches of a vertical: AdBench's impressions with the campaign as
/// one of `credits` values of `credit` (an affiliate, an introducing
/// broker), and AdBench's five channels (display, email, search, social,
/// video) as `channels`.
fn touches(table: &'static str, owner: &'static str, credit: &str, credits: u32, channels: [&str; 5]) -> (&'static str, &'static str, String, String) {
    let [display, email, search, social, video] = channels;
    let sql = format!(
        "SELECT uid, ts, (campaign_id - 1) % {credits} + 1 AS {credit}, \
           CASE channel WHEN 'display' THEN '{display}' WHEN 'email' THEN '{email}' WHEN 'search' THEN '{search}' WHEN 'social' THEN '{social}' ELSE '{video}' END AS channel, \
           country, device, test_group FROM impressions"
    );
    let mut sorted = channels;
    sorted.sort();
    let columns = format!(
        r#"uid = {{ role = "join_key" }}
ts = {{ role = "dimension", domain = {{ from = "2026-01-01", to = "2026-03-31" }}, groups_per_person = "all" }}
{credit} = {{ role = "dimension", domain = {{ min = 1, max = {credits} }}, groups_per_person = 3 }}
channel = {{ role = "dimension", domain = [{}], groups_per_person = "all" }}
country = {{ role = "dimension", domain = ["AU", "BR", "CA", "DE", "ES", "FR", "GB", "IN", "JP", "US"], groups_per_person = 1 }}
device = {{ role = "dimension", domain = ["ctv", "desktop", "mobile", "tablet"], groups_per_person = "all" }}
test_group = {{ role = "dimension", domain = ["control", "test"], groups_per_person = 1 }}"#,
        sorted.map(|c| format!("\"{c}\"")).join(", ")
    );
    (table, owner, sql, columns)
}

/// The lift, reach, cohorts and match-rate defaults of a vertical whose
/// touches and outcomes are `touches` and `outcomes`, with `value` the
/// outcome's measure.
fn common_studies(touches: &str, outcomes: &str, value: &str) -> String {
    format!(
        r#"# `cleanroom study lift`: did the promotion (test) bring more customers
# within 30 days of their first touch than the hold-out (control)?
[studies.lift]
exposure = "{touches}"
outcome = "{outcomes}"
group = "test_group"
control = "control"
window_days = 30
value = "{value}"

[studies.reach]
exposure = "{touches}"
channel = "channel"
buckets = "1,2,3,5,10"

# Weekly cohorts by first touch, and their outcomes in the 6 weeks from it.
[studies.cohorts]
exposure = "{touches}"
outcome = "{outcomes}"
period = "week"
periods = 6
value = "{value}"

[studies.match_rate]
left = "{touches}"
right = "{outcomes}"
"#
    )
}

fn profile(vertical: Vertical) -> Profile {
    match vertical {
        Vertical::Igaming => Profile {
            name: "igaming",
            about: "An affiliate network refers players to an online casino and sportsbook operator; the operator pays each affiliate a RevShare of the net gaming revenue (GGR) of the players it referred.",
            touches: touches("affiliate_clicks", "affiliates", "affiliate_id", 25, ["banner", "email", "seo", "social", "streamer"]),
            outcomes: (
                "player_activity",
                "operator",
                "SELECT uid, ts, order_id AS session_id, round(revenue * 2.0, 2) AS deposit, \
                   round(CASE WHEN order_id % 4 = 0 THEN -0.6 * revenue ELSE 0.9 * revenue END, 2) AS ggr, \
                   CASE product_category WHEN 'apparel' THEN 'slots' WHEN 'beauty' THEN 'roulette' WHEN 'books' THEN 'poker' WHEN 'electronics' THEN 'sports' \
                     WHEN 'garden' THEN 'bingo' WHEN 'grocery' THEN 'slots' WHEN 'home' THEN 'blackjack' ELSE 'live_casino' END AS game, \
                   is_return AS is_chargeback FROM conversions",
                r#"session_id = { role = "hidden" }
deposit = { role = "measure", bounds = [0, 1000] }
# Net gaming revenue of a session: the player's losses, negative when they win.
ggr = { role = "measure", bounds = [-300, 450] }
game = { role = "dimension", domain = ["bingo", "blackjack", "live_casino", "poker", "roulette", "slots", "sports"], groups_per_person = "all" }
is_chargeback = { role = "dimension", groups_per_person = 2 }"#,
            ),
            attribution_about: "each session's GGR credited to the affiliate whose link the player clicked last in the 30 days before it; chargebacks reverse their GGR; a 30 % RevShare on the net GGR.",
            commission_rate: 0.3,
            credit: "affiliate_id",
            value: "ggr",
            returns: "is_chargeback",
            value_cap: (-300.0, 300.0),
            lift_value: "deposit",
            lift_cap: 4000.0,
        },
        Vertical::Forex => Profile {
            name: "forex",
            about: "Introducing brokers (IBs) refer traders to a Forex and CFD broker; the broker pays each IB a commission per lot its referred traders trade, without either side seeing a trader's positions.",
            touches: touches("ib_referrals", "introducers", "ib_id", 12, ["banner", "email", "seo", "social", "webinar"]),
            outcomes: (
                "trades",
                "broker",
                "SELECT uid, ts, order_id AS trade_id, GREATEST(round(revenue / 50.0, 2), 0.01) AS lots, \
                   CASE product_category WHEN 'apparel' THEN 'EURUSD' WHEN 'beauty' THEN 'GBPUSD' WHEN 'books' THEN 'USDJPY' WHEN 'electronics' THEN 'XAUUSD' \
                     WHEN 'garden' THEN 'US30' WHEN 'grocery' THEN 'EURUSD' WHEN 'home' THEN 'AUDUSD' ELSE 'BTCUSD' END AS instrument, \
                   is_return AS is_cancelled FROM conversions",
                r#"trade_id = { role = "hidden" }
lots = { role = "measure", bounds = [0, 10] }
instrument = { role = "dimension", domain = ["AUDUSD", "BTCUSD", "EURUSD", "GBPUSD", "US30", "USDJPY", "XAUUSD"], groups_per_person = "all" }
is_cancelled = { role = "dimension", groups_per_person = 2 }"#,
            ),
            attribution_about: "each trade's lots credited to the IB that referred the trader last in the 30 days before it; cancelled trades earn nothing; a commission of 5 (USD) per lot.",
            commission_rate: 5.0,
            credit: "ib_id",
            value: "lots",
            returns: "is_cancelled",
            value_cap: (0.0, 10.0),
            lift_value: "lots",
            lift_cap: 40.0,
        },
        Vertical::Ecommerce => Profile {
            name: "ecommerce",
            about: "Publishers (coupon, cashback, content and comparison sites) send shoppers to a merchant; the merchant pays each publisher a commission on its orders, reversed for returned orders.",
            touches: touches("affiliate_clicks", "publishers", "publisher_id", 40, ["content", "newsletter", "comparison", "social", "cashback"]),
            outcomes: (
                "orders",
                "merchant",
                "SELECT uid, ts, order_id, revenue AS order_value, product_category AS category, is_return FROM conversions",
                r#"order_id = { role = "hidden" }
order_value = { role = "measure", bounds = [0, 500] }
category = { role = "dimension", domain = ["apparel", "beauty", "books", "electronics", "garden", "grocery", "home", "toys"], groups_per_person = "all" }
is_return = { role = "dimension", groups_per_person = 2 }"#,
            ),
            attribution_about: "each order credited to the publisher whose link the shopper clicked last in the 30 days before it; returned orders reverse their commission; 8 % of the net order value.",
            commission_rate: 0.08,
            credit: "publisher_id",
            value: "order_value",
            returns: "is_return",
            value_cap: (0.0, 500.0),
            lift_value: "order_value",
            lift_cap: 2000.0,
        },
        Vertical::Adbench => unreachable!("AdBench is generated as is"),
    }
}

/// Writes the collaboration of `vertical` (not AdBench) under `opts.out_dir`.
pub(crate) async fn generate(opts: &GenerateOptions, vertical: Vertical) -> Result<GenerateSummary> {
    let profile = profile(vertical);
    let out_dir = opts.out_dir.clone();
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let truth_path = out_dir.join("truth.json");
    if truth_path.exists() {
        fs::remove_file(&truth_path).with_context(|| format!("removing {}", truth_path.display()))?;
    }
    // The population, drawn as AdBench parts in a scratch directory.
    let source = out_dir.join(".population");
    let drawn = generate_adbench(&GenerateOptions { out_dir: source.clone(), truth: false, vertical: Vertical::Adbench, ..opts.clone() }).await?;
    let mut summary = GenerateSummary { out_dir: out_dir.clone(), tables: [profile.touches.0, profile.outcomes.0], ..drawn };
    for (from, table, sql) in [("impressions", profile.touches.0, profile.touches.2.as_str()), ("conversions", profile.outcomes.0, profile.outcomes.2)] {
        let rows = rewrite_parts(&source.join("data").join(from), &out_dir.join("data").join(table), from, sql).await?;
        match from {
            "impressions" => summary.impressions = rows,
            _ => summary.conversions = rows,
        }
    }
    fs::remove_dir_all(&source).with_context(|| format!("removing {}", source.display()))?;

    let parties = [profile.touches.1, profile.outcomes.1];
    write_atomically(&out_dir.join("manifest.toml"), manifest(&profile, opts)?.as_bytes(), false)?;
    write_atomically(&out_dir.join("credentials.toml"), credentials_toml(opts.seed, &parties).as_bytes(), true)?;
    write_atomically(&out_dir.join("collaboration.key"), DEMO_COLLABORATION_KEY, true)?;
    if opts.truth {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        for table in [profile.touches.0, profile.outcomes.0] {
            let location = format!("{}/", out_dir.join("data").join(table).display());
            ctx.register_parquet(table, &location, ParquetReadOptions::default()).await?;
        }
        let queries = vec![
            ("study_match_rate".to_string(), match_rate_truth_sql(profile.touches.0, profile.outcomes.0)),
            ("study_lift".to_string(), lift_truth_sql(profile.touches.0, profile.outcomes.0, profile.lift_value, profile.lift_cap)),
            (
                "study_attribution".to_string(),
                attribution_truth_sql(profile.touches.0, profile.outcomes.0, profile.credit, profile.value, profile.returns, profile.value_cap),
            ),
        ];
        let truth = truth_json(&ctx, opts.scale_factor, opts.seed, queries, &indicatif::ProgressBar::hidden()).await?;
        write_atomically(&truth_path, &truth, false)?;
    }
    Ok(summary)
}

/// Each AdBench part of `from_dir` (a table `name`) rewritten by `sql` into
/// the same part of `to_dir`; the parts are published once all are written.
async fn rewrite_parts(from_dir: &Path, to_dir: &Path, name: &str, sql: &str) -> Result<u64> {
    fs::create_dir_all(to_dir).with_context(|| format!("creating {}", to_dir.display()))?;
    for entry in fs::read_dir(to_dir)? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(is_generated_part) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    let mut parts: Vec<String> = fs::read_dir(from_dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        .collect();
    parts.sort();
    let mut rows = 0;
    let mut written = Vec::new();
    for (shard, part) in parts.iter().enumerate() {
        // One partition: the rows keep their order, so the bytes are reproducible.
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        ctx.register_parquet(name, &from_dir.join(part).display().to_string(), ParquetReadOptions::default()).await?;
        let frame = ctx.sql(sql).await.with_context(|| format!("mapping {name}"))?;
        let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await?;
        let final_name = part_name(shard as u64);
        let temp = to_dir.join(temp_name(&final_name));
        let mut writer = PartWriter::create(&temp, schema)?;
        for batch in &batches {
            writer.write(batch)?;
        }
        rows += writer.close()?;
        written.push((temp, to_dir.join(final_name)));
    }
    for (temp, final_path) in written {
        fs::rename(&temp, &final_path).with_context(|| format!("renaming {}", temp.display()))?;
    }
    Ok(rows)
}

fn manifest(profile: &Profile, opts: &GenerateOptions) -> Result<String> {
    let (touches, touch_owner, _, touch_columns) = &profile.touches;
    let (outcomes, outcome_owner, _, outcome_columns) = profile.outcomes;
    Ok(format!(
        r#"# {name} demo collaboration, generated by `cleanroom generate --vertical {name} --sf {sf} --seed {seed}`.
# {about}
# {touch_owner} owns {touches}, {outcome_owner} owns {outcomes}; both may query both.
# Passwords for these hashes are in credentials.toml.

[collaboration]
name = "{name}"

[defaults]
epsilon = 1.0
max_epsilon_per_query = 5.0
max_delta_per_query = 1e-6
max_groups_contributed = 1
max_contributions_per_group = 10

{studies}
[[parties]]
name = "{touch_owner}"
password = "{touch_hash}"
epsilon_budget = 50.0
delta_budget = 1e-5

[[parties]]
name = "{outcome_owner}"
password = "{outcome_hash}"
epsilon_budget = 50.0
delta_budget = 1e-5

[[datasets]]
name = "{touches}"
owner = "{touch_owner}"
location = "data/{touches}/"
format = "parquet"
privacy_unit = "uid"
readers = ["{touch_owner}", "{outcome_owner}"]

[datasets.columns]
{touch_columns}

[[datasets]]
name = "{outcomes}"
owner = "{outcome_owner}"
location = "data/{outcomes}/"
format = "parquet"
privacy_unit = "uid"
readers = ["{touch_owner}", "{outcome_owner}"]

[datasets.columns]
uid = {{ role = "join_key" }}
# An outcome follows a touch by at most 30 days and a second.
ts = {{ role = "dimension", domain = {{ from = "2026-01-01", to = "2026-05-01" }}, groups_per_person = "all" }}
{outcome_columns}
"#,
        name = profile.name,
        about = profile.about,
        studies = format!(
            "# `cleanroom study attribution`: {about}\n[studies.attribution]\ntouches = \"{touches}\"\noutcome = \"{outcomes}\"\n\
             credit = \"{credit}\"\nmodel = \"last\"\nwindow_days = 30\nvalue = \"{value}\"\nreturns = \"{returns}\"\n\
             commission_rate = {rate:?}\n\
             # A person's value per key, counted up to this (and as far below 0 for a value that can be).\n\
             value_cap = {cap:?}\n\n{common}",
            about = profile.attribution_about,
            credit = profile.credit,
            value = profile.value,
            returns = profile.returns,
            rate = profile.commission_rate,
            cap = profile.value_cap.1,
            common = common_studies(touches, outcomes, profile.lift_value),
        ),
        sf = opts.scale_factor,
        seed = opts.seed,
        touch_hash = password_hash(opts.seed, touch_owner)?,
        outcome_hash = password_hash(opts.seed, outcome_owner)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vertical's manifest loads, and its studies name its datasets.
    #[test]
    fn vertical_manifests_parse() {
        for vertical in [Vertical::Igaming, Vertical::Forex, Vertical::Ecommerce] {
            let profile = profile(vertical);
            let opts = GenerateOptions { scale_factor: 0.01, out_dir: "/nonexistent".into(), seed: 1, progress: false, truth: false, vertical };
            let text = manifest(&profile, &opts).unwrap();
            let parsed: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", profile.name));
            assert_eq!(parsed["studies"]["attribution"]["touches"].as_str(), Some(profile.touches.0));
            assert_eq!(parsed["studies"]["attribution"]["credit"].as_str(), Some(profile.credit));
        }
    }
}
