-- 003_offline_quota: the stored-message quotas of the offline plugin
-- (issue 12; plugins/offline/README.md "Quotas", docs/architecture.md
-- "Offline quotas").  from_id is the sender of each stored message (0:
-- unknown, e.g. rows stored before this migration).  The per-recipient
-- count reads ix_offline_user (user_id, id); the per-sender count reads
-- ix_offline_from (user_id, from_id), both bounded by LIMIT.  IF NOT EXISTS:
-- a run that stopped half-way can be run again.  Adding a column with a
-- default is instant on InnoDB (MariaDB >= 10.3); the index is built online.
ALTER TABLE offline_messages
  ADD COLUMN IF NOT EXISTS from_id BIGINT NOT NULL DEFAULT 0 AFTER user_id,
  ADD KEY IF NOT EXISTS ix_offline_from (user_id, from_id);
