-- Attention on real captures: which token rows are exact, and each head's attention status.
ALTER TABLE token_attention ADD COLUMN IF NOT EXISTS "exact" BOOLEAN;
ALTER TABLE head_attention_summary ADD COLUMN IF NOT EXISTS status VARCHAR;
ALTER TABLE head_attention_summary ADD COLUMN IF NOT EXISTS status_reason VARCHAR;
ALTER TABLE head_attention_summary ADD COLUMN IF NOT EXISTS n_exact_rows BIGINT;
ALTER TABLE head_attention_summary ADD COLUMN IF NOT EXISTS exact_row_frac DOUBLE;
ALTER TABLE head_attention_summary ADD COLUMN IF NOT EXISTS min_exact_rows INTEGER;
