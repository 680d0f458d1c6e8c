-- Per-layer AP of the latest run of every model, for a paper's table: the layer's heads with a finite
-- ap_overall, their mean, spread and quartiles, and two 95% intervals of the mean. Uses the macro
-- t_quantile_975 (sql/trajectories.sql, which runs before this file).
CREATE OR REPLACE VIEW latest_layer_plasticity AS
WITH heads AS (
    SELECT model, run_id, layer, ap_overall, ap_overall_se, ap_se_df
    FROM latest_head_metrics
), stats AS (
    SELECT model, run_id, layer,
           count(*) FILTER (WHERE isfinite(ap_overall))                       AS n_heads,
           count(*) FILTER (WHERE NOT isfinite(ap_overall))                   AS n_not_finite,
           avg(ap_overall) FILTER (WHERE isfinite(ap_overall))                AS mean_ap,
           stddev_samp(ap_overall) FILTER (WHERE isfinite(ap_overall))        AS sd_ap,
           quantile_cont(ap_overall, 0.5) FILTER (WHERE isfinite(ap_overall))  AS median_ap,
           quantile_cont(ap_overall, 0.25) FILTER (WHERE isfinite(ap_overall)) AS q1_ap,
           quantile_cont(ap_overall, 0.75) FILTER (WHERE isfinite(ap_overall)) AS q3_ap,
           min(ap_overall) FILTER (WHERE isfinite(ap_overall))                AS min_ap,
           max(ap_overall) FILTER (WHERE isfinite(ap_overall))                AS max_ap,
           -- the plots' interval of the mean needs every counted head's error: one unknown SE, no bound
           coalesce(bool_and(isfinite(ap_overall_se) AND ap_se_df >= 1) FILTER (WHERE isfinite(ap_overall)),
                    false)                                                    AS all_se_known,
           avg(ap_overall_se) FILTER (WHERE isfinite(ap_overall))             AS mean_se,
           min(ap_se_df) FILTER (WHERE isfinite(ap_overall))                  AS min_se_df
    FROM heads
    GROUP BY model, run_id, layer
)
SELECT model, run_id, layer, n_heads, n_not_finite, mean_ap, median_ap, q1_ap, q3_ap, min_ap, max_ap, sd_ap,
       mean_ap - t_quantile_975(n_heads - 1) * sd_ap / sqrt(n_heads) AS ci_low,
       mean_ap + t_quantile_975(n_heads - 1) * sd_ap / sqrt(n_heads) AS ci_high,
       CASE WHEN all_se_known THEN mean_se END AS se_bound,
       CASE WHEN all_se_known THEN min_se_df END AS se_df,
       CASE WHEN all_se_known THEN greatest(0.0, least(1.0, mean_ap - t_quantile_975(min_se_df) * mean_se)) END
           AS mean_ci_low,
       CASE WHEN all_se_known THEN greatest(0.0, least(1.0, mean_ap + t_quantile_975(min_se_df) * mean_se)) END
           AS mean_ci_high
FROM stats
ORDER BY model, layer;
