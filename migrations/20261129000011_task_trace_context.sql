-- The W3C trace context of the request that enqueued each task (also in its `enqueued` event):
-- every attempt's span continues that trace. NULL for tasks enqueued before it was recorded.
ALTER TABLE tasks ADD COLUMN traceparent text, ADD COLUMN tracestate text;
