-- 002_durable: durable messages (issue 8; docs/architecture.md, "Durable
-- messaging").  A conversation is a pair of users (conv_id = a << 32 | b,
-- a < b) or a group (conv_id = -group id).

-- One row per conversation: its newest cseq.  The writer's transaction
-- moves head on by the number of messages it stores, under this row's
-- lock, so nodes writing one conversation never number twice.  user_a and
-- user_b (pairs only) find a user's pair conversations for SYNC.
CREATE TABLE IF NOT EXISTS conv_heads (
  conv_id BIGINT NOT NULL,
  head    BIGINT NOT NULL,
  user_a  BIGINT NULL,
  user_b  BIGINT NULL,
  PRIMARY KEY (conv_id),
  KEY ix_conv_heads_a (user_a),
  KEY ix_conv_heads_b (user_b)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Every durable message once (a group message once, not per member),
-- clustered in the order every read wants: (conv_id, cseq).  body is the
-- forwarded frame as sent (bytes); mid/conv/cseq are added when it is sent.
-- (sender_id, cid) is the idempotency key of a client's retries.  No
-- foreign keys: users and groups are never deleted, and a check per row
-- would cost a lookup per message.
CREATE TABLE IF NOT EXISTS messages (
  conv_id    BIGINT NOT NULL,
  cseq       BIGINT NOT NULL,
  id         BIGINT NOT NULL,
  sender_id  BIGINT NOT NULL,
  cid        VARBINARY(64) NULL,
  body       MEDIUMBLOB NOT NULL,
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (conv_id, cseq),
  UNIQUE KEY uq_messages_cid (sender_id, cid)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Message ids are handed out in blocks: UPDATE ... SET next_id =
-- LAST_INSERT_ID(next_id + block) reserves [new - block, new).
CREATE TABLE IF NOT EXISTS id_blocks (
  name    VARCHAR(32) CHARACTER SET ascii NOT NULL,
  next_id BIGINT NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

INSERT IGNORE INTO id_blocks (name, next_id) VALUES ('message', 1);

-- Receipts: how far each participant has received ("delivered") and read
-- a conversation, as cseq values that only grow (READ, msgid 17).
CREATE TABLE IF NOT EXISTS conv_marks (
  conv_id   BIGINT NOT NULL,
  user_id   BIGINT NOT NULL,
  delivered BIGINT NOT NULL DEFAULT 0,
  read_seq  BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (conv_id, user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
