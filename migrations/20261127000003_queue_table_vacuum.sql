-- The outbox is a queue table: every row is inserted, updated once (published) and deleted
-- within seconds, and each task row is updated three or four times in its life. With the default
-- autovacuum thresholds (20% of the table) dead tuples pile up between runs and every claim scans
-- them. Vacuum these tables after a fixed number of changes instead, without throttling.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000
);
ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 80
);
