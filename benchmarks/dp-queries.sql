-- AdBench in DP SQL: what an analyst sends to cleanroom to estimate the answers of
-- queries.sql (the exact answers in truth.json) with differential privacy, at epsilon = 1
-- each. Each query starts with a line "-- name: <id>" (the same ids as queries.sql); the
-- output columns carry the names of truth.json's, so answers can be compared column by column.
-- Contribution bounds are chosen from the generator's shape (how many channels, affiliates
-- and conversions one person has), not from the data: a bound that clips many people
-- biases the answer, one that is too wide adds noise.

-- name: Q1_match_rate
-- One row per person with 0/1 flags; the three counts are sums of flags (sensitivity 1 each).
WITH seen AS (
  SELECT uid, 1 AS exposed, 0 AS converted FROM impressions
  UNION ALL
  SELECT uid, 0 AS exposed, 1 AS converted FROM conversions
),
people AS (
  SELECT uid, MAX(exposed) AS exposed, MAX(converted) AS converted FROM seen GROUP BY uid
)
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1)
  SUM(exposed) AS imp_users,
  SUM(converted) AS conv_users,
  SUM(exposed * converted) AS matched_users
FROM people;

-- name: Q2_affiliate_ltv
-- Per person and affiliate: revenue and conversions of exposed converters, each clamped
-- (LEAST) per person, which gives the DP sums their bounds; a person counts towards at
-- most 2 affiliates, and has one row per affiliate (inferred from the GROUP BY).
WITH exposed AS (SELECT DISTINCT uid FROM impressions),
per_person AS (
  SELECT c.uid, c.affiliate_id,
         LEAST(SUM(c.revenue), 1000) AS revenue, LEAST(COUNT(*), 5) AS conversions
  FROM conversions c JOIN exposed e ON c.uid = e.uid
  WHERE c.affiliate_id IS NOT NULL
  GROUP BY c.uid, c.affiliate_id
)
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_groups_contributed = 2)
  affiliate_id,
  SUM(revenue) AS revenue,
  COUNT(*) AS converters,
  SUM(conversions) AS conversions
FROM per_person
GROUP BY affiliate_id
ORDER BY affiliate_id;

-- name: Q3_incrementality
-- Per-person first exposure and revenue after it (a join on the privacy unit, then a
-- per-person aggregate); the DP aggregate counts exposed people and converters per test group.
WITH exposed AS (
  SELECT uid, MIN(test_group) AS test_group, MIN(ts) AS first_ts
  FROM impressions GROUP BY uid
),
conv_after AS (
  SELECT c.uid, LEAST(SUM(c.revenue), 2000) AS revenue
  FROM conversions c JOIN exposed e ON c.uid = e.uid
  WHERE c.ts > e.first_ts
  GROUP BY c.uid
)
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1)
  e.test_group,
  COUNT(*) AS exposed_users,
  COUNT(a.uid) AS converters,
  SUM(a.revenue) AS revenue
FROM exposed e LEFT JOIN conv_after a ON e.uid = a.uid
GROUP BY e.test_group
ORDER BY e.test_group;

-- name: Q4_reach_frequency
-- People and impressions per channel; the average frequency is computed from the two
-- noisy values (post-processing, no extra cost).
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_groups_contributed = 5, max_contributions_per_group = 200)
  channel,
  COUNT(DISTINCT uid) AS users,
  COUNT(*) AS impressions,
  CAST(COUNT(*) AS DOUBLE) / COUNT(DISTINCT uid) AS avg_frequency
FROM impressions
GROUP BY channel
ORDER BY channel;

-- name: Q5_last_touch
-- Each conversion credited to the person's latest impression before it (a window
-- partitioned by the person and the conversion), per campaign and conversion day.
WITH touches AS (
  SELECT c.uid, c.revenue, CAST(c.ts AS DATE) AS day, i.campaign_id,
         ROW_NUMBER() OVER (PARTITION BY c.uid, c.ts ORDER BY i.ts DESC) AS rn
  FROM conversions c
  JOIN impressions i ON c.uid = i.uid AND i.ts < c.ts
)
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_groups_contributed = 3, max_contributions_per_group = 2)
  campaign_id, day, COUNT(*) AS conversions, SUM(revenue) AS revenue
FROM touches
WHERE rn = 1
GROUP BY campaign_id, day
ORDER BY campaign_id, day;
