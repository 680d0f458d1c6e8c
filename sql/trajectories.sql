-- Trajectories of families of checkpoints (issue 17): the latest run of every model that has a
-- family (table models: family, stage, step), per checkpoint and layer or head. Rerun after every
-- upgrade (warehouse/schema.py), and over the union of several warehouse files by
-- `plasticity sql --warehouse a --warehouse b` (warehouse/db.py), so one query serves both.

-- Student's t quantile t_0.975(df): exact values (scipy.stats.t.ppf) for df 1..299; from 300 on,
-- Fisher's (1925) expansion in 1/df to the fifth order, within 2 ulp of scipy there. NULL for df < 1.
CREATE OR REPLACE MACRO t_quantile_975(df) AS
    CASE
        WHEN df IS NULL OR df < 1 THEN NULL
        WHEN df < 300 THEN [
    1.27062047361746941e+01, 4.30265272974946189e+00, 3.18244630528370775e+00, 2.77644510519779342e+00,
    2.57058183563631459e+00, 2.44691185114497856e+00, 2.36462425159278400e+00, 2.30600413520416581e+00,
    2.26215716279820489e+00, 2.22813885198627393e+00, 2.20098516009163880e+00, 2.17881282966722845e+00,
    2.16036865646279130e+00, 2.14478668791780391e+00, 2.13144954555977595e+00, 2.11990529922125459e+00,
    2.10981557783331564e+00, 2.10092204024103824e+00, 2.09302405440830874e+00, 2.08596344726586391e+00,
    2.07961384472767952e+00, 2.07387306790402537e+00, 2.06865761041904861e+00, 2.06389856162802454e+00,
    2.05953855275329722e+00, 2.05552943864287352e+00, 2.05183051648028458e+00, 2.04840714179524541e+00,
    2.04522964213270297e+00, 2.04227245630123777e+00, 2.03951344639640819e+00, 2.03693334346010158e+00,
    2.03451529744933834e+00, 2.03224450931771861e+00, 2.03010792825034292e+00, 2.02809400098045023e+00,
    2.02619246302910927e+00, 2.02439416391196936e+00, 2.02269092003676088e+00, 2.02107539030627281e+00,
    2.01954097044137582e+00, 2.01808170281844435e+00, 2.01669219922782395e+00, 2.01536757444376358e+00,
    2.01410338888084617e+00, 2.01289559891942904e+00, 2.01174051372976548e+00, 2.01063475762423183e+00,
    2.00957523712923924e+00, 2.00855911210076110e+00, 2.00758377031583590e+00, 2.00664680506168791e+00,
    2.00574599531786868e+00, 2.00487928818805639e+00, 2.00404478328914548e+00, 2.00324071884787180e+00,
    2.00246545929100694e+00, 2.00171748414523565e+00, 2.00099537808826700e+00, 2.00029782201426043e+00,
    1.99962358499493909e+00, 1.99897151703337883e+00, 1.99834054252074100e+00, 1.99772965431769300e+00,
    1.99713790839200378e+00, 1.99656441895231174e+00, 1.99600835402529597e+00, 1.99546893142984350e+00,
    1.99494541510723744e+00, 1.99443711177118610e+00, 1.99394336784562554e+00, 1.99346356666187186e+00,
    1.99299712588985489e+00, 1.99254349518093199e+00, 1.99210215400224167e+00, 1.99167260964466419e+00,
    1.99125439538838456e+00, 1.99084706881169060e+00, 1.99045021023012847e+00, 1.99006342125444591e+00,
    1.98968632345690288e+00, 1.98931855713657191e+00, 1.98895978017516240e+00, 1.98860966697570829e+00,
    1.98826790747722160e+00, 1.98793420623901995e+00, 1.98760828158907077e+00, 1.98728986483116921e+00,
    1.98697869950628103e+00, 1.98667454070376825e+00, 1.98637715441861773e+00, 1.98608631695113003e+00,
    1.98580181434582270e+00, 1.98552344186660390e+00, 1.98525100350549777e+00, 1.98498431152245702e+00,
    1.98472318601398445e+00, 1.98446745450848150e+00, 1.98421695158641742e+00, 1.98397151852355180e+00,
    1.98373100295560589e+00, 1.98349525856287934e+00, 1.98326414477345647e+00, 1.98303752648372589e+00,
    1.98281527379504752e+00, 1.98259726176550055e+00, 1.98238337017569077e+00, 1.98217348330772691e+00,
    1.98196748973648251e+00, 1.98176528213237191e+00, 1.98156675707490071e+00, 1.98137181487630532e+00,
    1.98118035941466109e+00, 1.98099229797585674e+00, 1.98080754110390944e+00, 1.98062600245908937e+00,
    1.98044759868340248e+00, 1.98027224927297407e+00, 1.98009987645693974e+00, 1.97993040508244023e+00,
    1.97976376250538677e+00, 1.97959987848663821e+00, 1.97943868509330345e+00, 1.97928011660485481e+00,
    1.97912410942379768e+00, 1.97897060199062813e+00, 1.97881953470285388e+00, 1.97867084983783492e+00,
    1.97852449147925769e+00, 1.97838040544702221e+00, 1.97823853923037984e+00, 1.97809884192413032e+00,
    1.97796126416772622e+00, 1.97782575808712435e+00, 1.97769227723925267e+00, 1.97756077655893492e+00,
    1.97743121230817476e+00, 1.97730354202765057e+00, 1.97717772449033302e+00, 1.97705371965709853e+00,
    1.97693148863425283e+00, 1.97681099363285973e+00, 1.97669219792979800e+00, 1.97657506583044329e+00,
    1.97645956263291778e+00, 1.97634565459381251e+00, 1.97623330889532700e+00, 1.97612249361374448e+00,
    1.97601317768919205e+00, 1.97590533089662013e+00, 1.97579892381793920e+00, 1.97569392781527009e+00,
    1.97559031500524918e+00, 1.97548805823434037e+00, 1.97538713105511521e+00, 1.97528750770344885e+00,
    1.97518916307659120e+00, 1.97509207271208442e+00, 1.97499621276747561e+00, 1.97490156000079864e+00,
    1.97480809175178695e+00, 1.97471578592379093e+00, 1.97462462096636093e+00, 1.97453457585847558e+00,
    1.97444563009238250e+00, 1.97435776365802940e+00, 1.97427095702805566e+00, 1.97418519114332480e+00,
    1.97410044739897650e+00, 1.97401670763097026e+00, 1.97393395410310690e+00, 1.97385216949450615e+00,
    1.97377133688752204e+00, 1.97369143975607342e+00, 1.97361246195438422e+00, 1.97353438770610423e+00,
    1.97345720159380322e+00, 1.97338088854882376e+00, 1.97330543384147372e+00, 1.97323082307154563e+00,
    1.97315704215915932e+00, 1.97308407733590307e+00, 1.97301191513626706e+00, 1.97294054238935979e+00,
    1.97286994621089629e+00, 1.97280011399544164e+00, 1.97273103340890987e+00, 1.97266269238130021e+00,
    1.97259507909966825e+00, 1.97252818200131808e+00, 1.97246198976721110e+00, 1.97239649131558048e+00,
    1.97233167579574986e+00, 1.97226753258213550e+00, 1.97220405126844334e+00, 1.97214122166204153e+00,
    1.97207903377850258e+00, 1.97201747783631465e+00, 1.97195654425175326e+00, 1.97189622363390882e+00,
    1.97183650677985911e+00, 1.97177738466998931e+00, 1.97171884846345269e+00, 1.97166088949376106e+00,
    1.97160349926451106e+00, 1.97154666944522661e+00, 1.97149039186733299e+00, 1.97143465852024091e+00,
    1.97137946154754373e+00, 1.97132479324333065e+00, 1.97127064604859470e+00, 1.97121701254775172e+00,
    1.97116388546525489e+00, 1.97111125766230311e+00, 1.97105912213364598e+00, 1.97100747200447168e+00,
    1.97095630052738846e+00, 1.97090560107948498e+00, 1.97085536715947174e+00, 1.97080559238490260e+00,
    1.97075627048947410e+00, 1.97070739532039219e+00, 1.97065896083581538e+00, 1.97061096110236367e+00,
    1.97056339029269800e+00, 1.97051624268315995e+00, 1.97046951265147641e+00, 1.97042319467452320e+00,
    1.97037728332615414e+00, 1.97033177327507625e+00, 1.97028665928278768e+00, 1.97024193620156951e+00,
    1.97019759897252622e+00, 1.97015364262367854e+00, 1.97011006226810337e+00, 1.97006685310212593e+00,
    1.97002401040355068e+00, 1.96998152952994454e+00, 1.96993940591695837e+00, 1.96989763507669169e+00,
    1.96985621259609900e+00, 1.96981513413543707e+00, 1.96977439542674726e+00, 1.96973399227237866e+00,
    1.96969392054354620e+00, 1.96965417617892258e+00, 1.96961475518326923e+00, 1.96957565362609510e+00,
    1.96953686764035041e+00, 1.96949839342115318e+00, 1.96946022722454339e+00, 1.96942236536626969e+00,
    1.96938480422060369e+00, 1.96934754021918113e+00, 1.96931056984987518e+00, 1.96927388965568761e+00,
    1.96923749623367783e+00, 1.96920138623390417e+00, 1.96916555635840207e+00, 1.96913000336017374e+00,
    1.96909472404221209e+00, 1.96905971525654011e+00, 1.96902497390327635e+00, 1.96899049692971739e+00,
    1.96895628132944545e+00, 1.96892232414145418e+00, 1.96888862244929408e+00, 1.96885517338023885e+00,
    1.96882197410446658e+00, 1.96878902183426407e+00, 1.96875631382324601e+00, 1.96872384736559036e+00,
    1.96869161979529461e+00, 1.96865962848544451e+00, 1.96862787084750068e+00, 1.96859634433059982e+00,
    1.96856504642087327e+00, 1.96853397464077684e+00, 1.96850312654843873e+00, 1.96847249973701910e+00,
    1.96844209183408347e+00, 1.96841190050099057e+00, 1.96838192343229501e+00, 1.96835215835515642e+00,
    1.96832260302876683e+00, 1.96829325524378973e+00, 1.96826411282180813e+00, 1.96823517361478473e+00,
    1.96820643550453633e+00, 1.96817789640221452e+00, 1.96814955424780247e+00, 1.96812140700961691e+00,
    1.96809345268382208e+00, 1.96806568929395764e+00, 1.96803811489046954e+00, 1.96801072755025519e+00,
    1.96798352537621613e+00, 1.96795650649681964e+00, 1.96792966906566980e+00
        ][df::BIGINT]
        ELSE (WITH z(z) AS (SELECT 1.959963984540054e0)
              SELECT z
                     + (z ^ 3 + z) / 4 / df
                     + (5 * z ^ 5 + 16 * z ^ 3 + 3 * z) / 96 / df ^ 2
                     + (3 * z ^ 7 + 19 * z ^ 5 + 17 * z ^ 3 - 15 * z) / 384 / df ^ 3
                     + (79 * z ^ 9 + 776 * z ^ 7 + 1482 * z ^ 5 - 1920 * z ^ 3 - 945 * z) / 92160 / df ^ 4
                     + (27 * z ^ 11 + 339 * z ^ 9 + 930 * z ^ 7 - 1782 * z ^ 5 - 765 * z ^ 3 + 17955 * z)
                       / 368640 / df ^ 5
              FROM z)
    END;

-- Every model with a family, with its latest run (any status).
CREATE OR REPLACE VIEW family_checkpoints AS
SELECT m.family, m.stage, m.step, m.model, r.run_id, r.revision, r.status, r.started_at,
       r.n_heads, r.n_done, r.n_errors
FROM models AS m
JOIN latest_runs AS r USING (model)
WHERE m.family IS NOT NULL;

-- One row per (checkpoint, head, metric) with a value: the numeric columns of head_metrics and
-- head_attention_summary of the latest run, as DOUBLE (NULLs, e.g. attention off, have no row).
CREATE OR REPLACE VIEW family_head_metrics_long AS
UNPIVOT (
    SELECT c.family, c.stage, c.step, c.model, c.run_id, h.layer, h.q_head, h.k_head,
           h.n_q_tokens::DOUBLE AS n_q_tokens,
           h.n_k_tokens::DOUBLE AS n_k_tokens,
           h.q_R2_pos::DOUBLE AS q_R2_pos,
           h.q_beta_norm::DOUBLE AS q_beta_norm,
           h.q_R2_scalar::DOUBLE AS q_R2_scalar,
           h.q_mae_baseline::DOUBLE AS q_mae_baseline,
           h.q_mae_proj::DOUBLE AS q_mae_proj,
           h.q_mae_ratio::DOUBLE AS q_mae_ratio,
           h.q_resid0_skew::DOUBLE AS q_resid0_skew,
           h.q_resid0_kurt::DOUBLE AS q_resid0_kurt,
           h.q_resid0_ks_p::DOUBLE AS q_resid0_ks_p,
           h.q_noise_med_abs_skew::DOUBLE AS q_noise_med_abs_skew,
           h.q_noise_med_abs_kurt::DOUBLE AS q_noise_med_abs_kurt,
           h.q_noise_med_ks_p::DOUBLE AS q_noise_med_ks_p,
           h.q_noise_frac_ks_p_lt_alpha::DOUBLE AS q_noise_frac_ks_p_lt_alpha,
           h.ap_overall::DOUBLE AS ap_overall,
           h.ap_overall_se::DOUBLE AS ap_overall_se,
           a.mean_entropy::DOUBLE AS mean_entropy,
           a.mean_entropy_ratio::DOUBLE AS mean_entropy_ratio,
           a.mean_max_attn::DOUBLE AS mean_max_attn,
           a.mean_k_eff::DOUBLE AS mean_k_eff,
           a.mean_query_norm::DOUBLE AS mean_query_norm,
           a.mean_n_keys::DOUBLE AS mean_n_keys,
           a.mean_key_coverage::DOUBLE AS mean_key_coverage,
           a.row_std::DOUBLE AS row_std,
           a.local_attn_near::DOUBLE AS local_attn_near,
           a.local_attn_far::DOUBLE AS local_attn_far,
           a.local_bias_ratio::DOUBLE AS local_bias_ratio,
           a.same_token_attn::DOUBLE AS same_token_attn,
           a.diff_token_attn::DOUBLE AS diff_token_attn,
           a.same_token_ratio::DOUBLE AS same_token_ratio,
           a.qvar_l2_adjacent::DOUBLE AS qvar_l2_adjacent,
           a.qvar_l2_distant::DOUBLE AS qvar_l2_distant,
           a.gain::DOUBLE AS gain,
           a.gain_r2::DOUBLE AS gain_r2
    FROM family_checkpoints AS c
    JOIN head_metrics AS h USING (model, run_id)
    LEFT JOIN head_attention_summary AS a USING (model, run_id, layer, q_head, k_head)
) ON
    n_q_tokens, n_k_tokens, q_R2_pos, q_beta_norm, q_R2_scalar, q_mae_baseline, q_mae_proj,
    q_mae_ratio, q_resid0_skew, q_resid0_kurt, q_resid0_ks_p, q_noise_med_abs_skew,
    q_noise_med_abs_kurt, q_noise_med_ks_p, q_noise_frac_ks_p_lt_alpha, ap_overall, ap_overall_se,
    mean_entropy, mean_entropy_ratio, mean_max_attn, mean_k_eff, mean_query_norm, mean_n_keys,
    mean_key_coverage, row_std, local_attn_near, local_attn_far, local_bias_ratio, same_token_attn,
    diff_token_attn, same_token_ratio, qvar_l2_adjacent, qvar_l2_distant, gain, gain_r2
INTO NAME metric VALUE value;

-- Per (checkpoint, layer, metric): the layer's heads with a finite value, their mean with a 95%
-- t-interval (the heads taken as a sample of the layer's heads), spread and quartiles.
CREATE OR REPLACE VIEW family_layer_metric_trajectory AS
WITH stats AS (
    SELECT family, stage, step, model, run_id, layer, metric,
           count(*) FILTER (WHERE isfinite(value))           AS n_heads,
           count(*) FILTER (WHERE NOT isfinite(value))       AS n_not_finite,
           avg(value) FILTER (WHERE isfinite(value))         AS mean_value,
           stddev_samp(value) FILTER (WHERE isfinite(value)) AS sd_value,
           quantile_cont(value, 0.5) FILTER (WHERE isfinite(value))  AS median_value,
           quantile_cont(value, 0.25) FILTER (WHERE isfinite(value)) AS q1_value,
           quantile_cont(value, 0.75) FILTER (WHERE isfinite(value)) AS q3_value,
           min(value) FILTER (WHERE isfinite(value))         AS min_value,
           max(value) FILTER (WHERE isfinite(value))         AS max_value
    FROM family_head_metrics_long
    GROUP BY family, stage, step, model, run_id, layer, metric
)
SELECT family, stage, step, model, run_id, layer, metric, n_heads, n_not_finite, mean_value, sd_value,
       mean_value - t_quantile_975(n_heads - 1) * sd_value / sqrt(n_heads) AS ci_low,
       mean_value + t_quantile_975(n_heads - 1) * sd_value / sqrt(n_heads) AS ci_high,
       median_value, q1_value, q3_value, min_value, max_value
FROM stats;

-- The same for ap_overall, with AP names.
CREATE OR REPLACE VIEW family_layer_trajectory AS
SELECT family, stage, step, model, run_id, layer, n_heads, n_not_finite,
       mean_value AS mean_ap, sd_value AS sd_ap, ci_low, ci_high,
       median_value AS median_ap, q1_value AS q1_ap, q3_value AS q3_ap, min_value AS min_ap, max_value AS max_ap
FROM family_layer_metric_trajectory
WHERE metric = 'ap_overall';

-- Head-level AP trajectories: every head of every checkpoint's latest run.
CREATE OR REPLACE VIEW family_head_trajectory AS
SELECT c.family, c.stage, c.step, c.model, c.run_id, h.layer, h.q_head, h.k_head, h.ap_overall, h.ap_overall_se
FROM family_checkpoints AS c
JOIN head_metrics AS h USING (model, run_id);
