-- A batch's rows for statements that join them to a large table by its key (streams/jsonrows.py,
-- `select(..., probe=True)`). The planner takes jsonb_array_elements for 100 rows whatever the
-- batch holds, so against a table of up to some 50k rows it hashed the batch and scanned the
-- whole table (2.4 ms to disarm 10 of 20,000 actions). Declared as one row, the batch drives a
-- nested loop that probes the table's primary key once per row: linear in the batch, whatever
-- the table's size. SET makes the function opaque to the planner (an inlined SQL function would
-- be planned as jsonb_array_elements again).
CREATE OR REPLACE FUNCTION parley_rows(batch text) RETURNS SETOF jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE ROWS 1
SET search_path = pg_catalog
AS $$ SELECT jsonb_array_elements(batch::jsonb) $$;
