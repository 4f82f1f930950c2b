-- The lifecycle agent writes a batch of messages as one statement, with no transaction around it
-- (streams/projection.py): its ledger claim and its conditional conversation updates are in that
-- statement, and this function ends it when either fell short (another writer got there first),
-- so the whole statement, and the batch with it, rolls back; the agent reads again and retries.
CREATE OR REPLACE FUNCTION parley_batch_check(claimed bigint, to_claim bigint, won bigint, to_win bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
  IF claimed <> to_claim OR won <> to_win THEN
    RAISE EXCEPTION 'parley: stale batch: claimed % of % events, won % of % conversation updates',
      claimed, to_claim, won, to_win
      USING ERRCODE = 'serialization_failure';
  END IF;
  RETURN won;
END
$$;
