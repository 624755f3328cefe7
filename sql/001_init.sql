-- 001_init: the seed's data in the shape the plugins need.
-- Names and descriptions are VARBINARY: compared and kept byte for byte (no
-- collation folding, no PAD SPACE surprises), so what a client sends is what
-- comes back.  The connection character set is utf8mb4 throughout.

CREATE TABLE IF NOT EXISTS users (
  id         BIGINT       NOT NULL AUTO_INCREMENT,
  name       VARBINARY(255) NOT NULL,
  pwhash     VARCHAR(255) CHARACTER SET ascii NOT NULL, -- yescrypt, "$y$..."
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (id),
  UNIQUE KEY uq_users_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- user_id added friend_id; the friend list of a user is the rows with its id.
CREATE TABLE IF NOT EXISTS friends (
  user_id    BIGINT NOT NULL,
  friend_id  BIGINT NOT NULL,
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (user_id, friend_id),
  KEY ix_friends_friend (friend_id),
  CONSTRAINT fk_friends_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE,
  CONSTRAINT fk_friends_friend FOREIGN KEY (friend_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS chat_groups (
  id          BIGINT NOT NULL AUTO_INCREMENT,
  name        VARBINARY(255)  NOT NULL,
  description VARBINARY(1024) NOT NULL DEFAULT '',
  created_by  BIGINT NULL,
  created_at  TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (id),
  UNIQUE KEY uq_groups_name (name),
  CONSTRAINT fk_groups_creator FOREIGN KEY (created_by) REFERENCES users (id) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS group_members (
  group_id  BIGINT NOT NULL,
  user_id   BIGINT NOT NULL,
  role      ENUM('creator','normal') NOT NULL DEFAULT 'normal',
  joined_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (group_id, user_id),
  KEY ix_group_members_user (user_id),
  CONSTRAINT fk_gm_group FOREIGN KEY (group_id) REFERENCES chat_groups (id) ON DELETE CASCADE,
  CONSTRAINT fk_gm_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Messages that could not be delivered, as the JSON text that would have been
-- sent.  BLOB: kept byte for byte.  Read back by (user_id, id): oldest first.
CREATE TABLE IF NOT EXISTS offline_messages (
  id         BIGINT NOT NULL AUTO_INCREMENT,
  user_id    BIGINT NOT NULL,
  message    MEDIUMBLOB NOT NULL,
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (id),
  KEY ix_offline_user (user_id, id),
  CONSTRAINT fk_offline_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Resume tokens: only SHA-256 of the token is stored (computed by the
-- server with SHA2()), so a leaked table does not log anybody in.
CREATE TABLE IF NOT EXISTS resume_tokens (
  token_hash BINARY(32) NOT NULL,
  user_id    BIGINT     NOT NULL,
  expires_at DATETIME   NOT NULL,
  PRIMARY KEY (token_hash),
  KEY ix_resume_user (user_id),
  KEY ix_resume_expires (expires_at),
  CONSTRAINT fk_resume_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
