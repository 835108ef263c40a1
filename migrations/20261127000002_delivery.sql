-- Delivery engine support.
--
-- The outbox holds exactly the deliveries that are pending or in transit: a worker deletes a
-- task's rows when it claims an attempt, and terminal transitions delete them too. Published
-- rows are therefore the deliveries Redis should hold, and re-publishing after a Redis loss is
-- "mark every published row unpublished".

-- The rescuer's work list: attempts whose lease ran out.
CREATE INDEX tasks_lease_idx ON tasks (lease_expires_at) WHERE lease_owner IS NOT NULL;

-- Published rows (few: deliveries in transit), for re-publishing.
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
