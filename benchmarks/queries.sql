-- AdBench: the reference clean-room workload, as PLAIN SQL (no privacy): the exact answers that
-- `cleanroom generate` writes to truth.json, and what peers are timed on.
--   impressions(uid, ts, campaign_id, creative_id, channel, country, device, test_group, cost_micros)
--   conversions(uid, ts, order_id, revenue, product_category, affiliate_id, is_return)
-- Each query starts with a line "-- name: <id>"; ORDER BY makes output deterministic.

-- name: Q1_match_rate
-- distinct uids in impressions, in conversions, and in their intersection
SELECT
  (SELECT count(DISTINCT uid) FROM impressions) AS imp_users,
  (SELECT count(DISTINCT uid) FROM conversions) AS conv_users,
  (SELECT count(*) FROM (SELECT uid FROM impressions
                         INTERSECT
                         SELECT uid FROM conversions) m) AS matched_users;

-- name: Q2_affiliate_ltv
-- revenue / converters by affiliate for converters who were exposed (semi-join on uid)
SELECT c.affiliate_id,
       sum(c.revenue)        AS revenue,
       count(DISTINCT c.uid) AS converters,
       count(*)              AS conversions
FROM conversions c
JOIN (SELECT DISTINCT uid FROM impressions) e ON c.uid = e.uid
WHERE c.affiliate_id IS NOT NULL
GROUP BY c.affiliate_id
ORDER BY c.affiliate_id;

-- name: Q3_incrementality
-- per test_group: exposed users, users converting after their first impression, their revenue
WITH exposed AS (
  SELECT uid, min(test_group) AS test_group, min(ts) AS first_ts
  FROM impressions GROUP BY uid
),
conv_after AS (
  SELECT c.uid, sum(c.revenue) AS revenue
  FROM conversions c JOIN exposed e ON c.uid = e.uid
  WHERE c.ts > e.first_ts
  GROUP BY c.uid
)
SELECT e.test_group,
       count(*)                     AS exposed_users,
       count(a.uid)                 AS converters,
       coalesce(sum(a.revenue), 0)  AS revenue
FROM exposed e LEFT JOIN conv_after a ON e.uid = a.uid
GROUP BY e.test_group
ORDER BY e.test_group;

-- name: Q4_reach_frequency
-- distinct users and average impressions per user, by channel
SELECT channel,
       count(DISTINCT uid)                                 AS users,
       count(*)                                            AS impressions,
       CAST(count(*) AS DOUBLE) / count(DISTINCT uid)      AS avg_frequency
FROM impressions
GROUP BY channel
ORDER BY channel;

-- name: Q5_last_touch
-- last-touch attribution: each conversion of an exposed user is credited to the campaign
-- of that user's latest impression strictly before the conversion ts; grouped by
-- campaign_id x conversion day. (impressions (uid, ts) is unique, so rn = 1 is unambiguous)
WITH touches AS (
  SELECT c.order_id, c.revenue, CAST(c.ts AS DATE) AS day, i.campaign_id,
         row_number() OVER (PARTITION BY c.order_id ORDER BY i.ts DESC) AS rn
  FROM conversions c
  JOIN impressions i ON c.uid = i.uid AND i.ts < c.ts
)
SELECT campaign_id, day, count(*) AS conversions, sum(revenue) AS revenue
FROM touches
WHERE rn = 1
GROUP BY campaign_id, day
ORDER BY campaign_id, day;
