-- A thread's conversations in log order. "The thread's current conversation" used to be the one
-- with the greatest opened_at, a wall-clock time taken by whichever API process received the
-- message: with two clocks 30 s apart a closed conversation could look newer than the open one,
-- and the thread's next message failed forever on conversations_open_thread. thread_seq is
-- assigned by the lifecycle agent in partition order (previous + 1), so it cannot go backwards;
-- the open conversation, when there is one, always has the thread's highest thread_seq.
ALTER TABLE conversations ADD COLUMN thread_seq bigint;
UPDATE conversations c SET thread_seq = s.n
FROM (SELECT id, row_number() OVER (PARTITION BY channel_id, contact_id
                                    ORDER BY (state <> 'closed'), opened_at, id) AS n
      FROM conversations) s
WHERE c.id = s.id;
ALTER TABLE conversations ALTER COLUMN thread_seq SET NOT NULL;
CREATE UNIQUE INDEX conversations_thread_seq ON conversations (channel_id, contact_id, thread_seq);
