-- Retention (PARLEY_RETENTION_DAYS, agents/ledger.py): closed conversations older than it are
-- deleted with their messages, receipts, audit rows and finished sends, oldest first, in chunks.
CREATE INDEX conversations_closed ON conversations (closed_at) WHERE state = 'closed';
-- A deleted conversation's successor loses its link (the FK check and the update use this).
CREATE INDEX conversations_previous ON conversations (previous_conversation_id)
    WHERE previous_conversation_id IS NOT NULL;
