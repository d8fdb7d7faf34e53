"""The ledger's PostgreSQL schema, one script per version; ``custodian._ledger_postgres`` applies them.

Never edit a released script: add the next one. ``custos_schema.version``
records how many have been applied. Version 1 is the SQLite schema as it
stands at its version 5 (``custodian._schema``), column for column, so the
record methods' statements (``custodian.ledger``) run unchanged on both, plus:

- ``leases.age``, an identity column ordering leases by when they were opened
  (SQLite orders by ``rowid``); its gaps after an abort do not matter.
- ``audit_head``, one row holding the audit chain's last (seq, hash). Every
  transaction that writes locks it first (``SELECT ... FOR UPDATE``), on every
  replica: the chain never forks and has no gaps, and writers are serialised
  as SQLite's ``BEGIN IMMEDIATE`` serialises them, so no read-modify-write
  loses an update.

Version 2 holds what a single custodian keeps in its data directory and every
replica must share (``custodian.replica``): the CA keys and the key-encryption
key, each wrapped by the master key (never in clear), and the sealed models'
ciphertext chunks.
"""

MIGRATIONS = (
    """
    CREATE TABLE models (
        model_id BYTEA PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        sha384 BYTEA NOT NULL,
        size BIGINT NOT NULL,
        chunk_size BIGINT NOT NULL,
        chunk_count BIGINT NOT NULL,
        wrapped_key BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        inputs TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE deployments (
        name TEXT PRIMARY KEY,
        model_id BYTEA NOT NULL REFERENCES models(model_id),
        manifest TEXT NOT NULL,
        token_sha256 BYTEA NOT NULL,
        offline_grace BIGINT NOT NULL,
        lease_size BIGINT NOT NULL,
        suspended BOOLEAN NOT NULL,
        balance BIGINT NOT NULL CHECK (balance >= 0),
        granted BIGINT NOT NULL,
        revoked BIGINT NOT NULL,
        used BIGINT NOT NULL,
        overdrawn BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        unreported BIGINT NOT NULL DEFAULT 0 CHECK (unreported >= 0),
        zeroize_after BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE spent_challenges (
        key BYTEA PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX spent_challenges_by_expiry ON spent_challenges(expires_at);
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL REFERENCES deployments(name),
        platform TEXT NOT NULL,
        public_key BYTEA NOT NULL,
        enrolled_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        last_seq BIGINT NOT NULL
    );
    CREATE INDEX instances_by_deployment ON instances(deployment);
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,
        instance_id TEXT NOT NULL REFERENCES instances(instance_id),
        deployment TEXT NOT NULL REFERENCES deployments(name),
        lim BIGINT NOT NULL,
        peak BIGINT NOT NULL,
        used BIGINT NOT NULL CHECK (used <= peak),
        state TEXT NOT NULL CHECK (state IN ('active', 'closed', 'expired')),
        expires_at DOUBLE PRECISION NOT NULL,
        unreported BIGINT NOT NULL DEFAULT 0 CHECK (unreported >= 0),
        age BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE UNIQUE INDEX one_active_lease ON leases(instance_id) WHERE state = 'active';
    CREATE INDEX active_leases_by_age ON leases(age) WHERE state = 'active';
    CREATE INDEX leases_by_deployment ON leases(deployment, state);
    CREATE INDEX leases_by_instance ON leases(instance_id, age);
    CREATE TABLE receipts (
        instance_id TEXT NOT NULL REFERENCES instances(instance_id),
        seq BIGINT NOT NULL,
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        used BIGINT NOT NULL,
        body BYTEA NOT NULL,
        signature BYTEA NOT NULL,
        digest BYTEA NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );
    CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL,
        hash BYTEA NOT NULL
    );
    CREATE TABLE audit_head (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        seq BIGINT NOT NULL,
        hash BYTEA NOT NULL
    );
    INSERT INTO audit_head VALUES (TRUE, 0, decode(repeat('00', 32), 'hex'));
    CREATE FUNCTION custos_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END
    $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION custos_append_only('the audit log is append-only');
    CREATE TRIGGER audit_append_only_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION custos_append_only('the audit log is append-only');
    CREATE TRIGGER receipts_append_only BEFORE UPDATE OR DELETE ON receipts
        FOR EACH ROW EXECUTE FUNCTION custos_append_only('receipts are append-only');
    CREATE TRIGGER receipts_append_only_truncate BEFORE TRUNCATE ON receipts
        FOR EACH STATEMENT EXECUTE FUNCTION custos_append_only('receipts are append-only');
    """,
    """
    CREATE TABLE shared_keys (
        name TEXT PRIMARY KEY,
        wrapped BYTEA NOT NULL,
        certificate BYTEA NOT NULL
    );
    CREATE TABLE sealed_chunks (
        model_id BYTEA NOT NULL,
        chunk BIGINT NOT NULL,
        ciphertext BYTEA NOT NULL,
        written_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model_id, chunk)
    );
    """,
    # Which replica holds each instance's control stream, refreshed at every keep-alive
    # (custodian enclaves shows it); a row not refreshed for a while belongs to a replica gone.
    """
    CREATE TABLE control_streams (
        instance_id TEXT PRIMARY KEY REFERENCES instances(instance_id),
        replica TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL
    );
    """,
    # What a model is ('classifier': a call is one unit; 'language': a unit is a token), and of a
    # language model's lease's ``used``, the prompt and completion tokens its receipts prove.
    """
    ALTER TABLE models ADD COLUMN kind TEXT NOT NULL DEFAULT 'classifier';
    ALTER TABLE leases ADD COLUMN prompt_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE leases ADD COLUMN completion_tokens BIGINT NOT NULL DEFAULT 0;
    """,
)
