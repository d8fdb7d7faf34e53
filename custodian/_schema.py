"""The ledger's SQLite schema, one script per version; ``custodian.ledger`` applies them in order.

Never edit a released script: add the next one. ``PRAGMA user_version`` records
how many have been applied.
"""

MIGRATIONS = (
    """
    CREATE TABLE models (
        model_id BLOB PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        sha384 BLOB NOT NULL,
        size INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        wrapped_key BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE deployments (
        name TEXT PRIMARY KEY,
        model_id BLOB NOT NULL REFERENCES models(model_id),
        manifest TEXT NOT NULL,
        token_sha256 BLOB NOT NULL,
        offline_grace INTEGER NOT NULL,
        lease_size INTEGER NOT NULL,
        suspended INTEGER NOT NULL,
        balance INTEGER NOT NULL CHECK (balance >= 0),
        granted INTEGER NOT NULL,
        revoked INTEGER NOT NULL,
        used INTEGER NOT NULL,
        overdrawn INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE challenges (
        nonce BLOB PRIMARY KEY,
        deployment TEXT NOT NULL REFERENCES deployments(name),
        expires_at REAL NOT NULL
    );
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL REFERENCES deployments(name),
        platform TEXT NOT NULL,
        public_key BLOB NOT NULL,
        enrolled_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        last_seq INTEGER NOT NULL
    );
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,
        instance_id TEXT NOT NULL REFERENCES instances(instance_id),
        deployment TEXT NOT NULL REFERENCES deployments(name),
        lim INTEGER NOT NULL,
        peak INTEGER NOT NULL,
        used INTEGER NOT NULL CHECK (used <= peak),
        state TEXT NOT NULL CHECK (state IN ('active', 'closed', 'expired')),
        expires_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX one_active_lease ON leases(instance_id) WHERE state = 'active';
    CREATE INDEX leases_by_deployment ON leases(deployment, state);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    """
    CREATE TABLE receipts (
        instance_id TEXT NOT NULL REFERENCES instances(instance_id),
        seq INTEGER NOT NULL,
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        used INTEGER NOT NULL,
        body BLOB NOT NULL,
        signature BLOB NOT NULL,
        digest BLOB NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );
    CREATE TRIGGER receipts_append_only_update BEFORE UPDATE ON receipts
        BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
    CREATE TRIGGER receipts_append_only_delete BEFORE DELETE ON receipts
        BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
    ALTER TABLE leases ADD COLUMN unreported INTEGER NOT NULL DEFAULT 0 CHECK (unreported >= 0);
    ALTER TABLE deployments ADD COLUMN unreported INTEGER NOT NULL DEFAULT 0 CHECK (unreported >= 0);
    ALTER TABLE deployments ADD COLUMN zeroize_after INTEGER NOT NULL DEFAULT 0;
    UPDATE deployments SET zeroize_after = 4 * offline_grace;
    """,
    # The sweep, the gauges and the roster read instances by deployment and leases by instance;
    # without these indexes each read scanned every instance or lease the ledger ever held.
    """
    CREATE INDEX instances_by_deployment ON instances(deployment);
    CREATE INDEX leases_by_instance ON leases(instance_id);
    """,
    # What the model takes, as its load check at `model add` found it (JSON); '' for older models.
    """
    ALTER TABLE models ADD COLUMN inputs TEXT NOT NULL DEFAULT '';
    """,
    # Challenges are stateless (custodian.challenges): only those spent by an enrolment are kept,
    # by digest, until they expire.
    """
    DROP TABLE challenges;
    CREATE TABLE spent_challenges (
        key BLOB PRIMARY KEY,
        expires_at REAL NOT NULL
    );
    CREATE INDEX spent_challenges_by_expiry ON spent_challenges(expires_at);
    """,
    # What a model is: 'classifier' (a call is one unit) or 'language' (a unit is a token).
    """
    ALTER TABLE models ADD COLUMN kind TEXT NOT NULL DEFAULT 'classifier';
    """,
    # A language model's leases: of ``used``, the prompt and completion tokens their receipts prove.
    """
    ALTER TABLE leases ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE leases ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0;
    """,
)
