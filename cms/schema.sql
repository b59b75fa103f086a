CREATE TABLE agents (
            agent_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, site TEXT NOT NULL, description TEXT,
            privacy TEXT NOT NULL, location_name TEXT, lat REAL, lon REAL,
            cpu TEXT, cores INTEGER, ram_mb INTEGER, accelerator TEXT,
            cost_per_call REAL, latency_ms REAL, load_queue INTEGER, load_busy INTEGER, load_inflight INTEGER,
            max_tokens_per_s REAL, card TEXT NOT NULL, updated REAL NOT NULL
        , kinds TEXT NOT NULL DEFAULT '', cap_names TEXT NOT NULL DEFAULT '', cooperations TEXT NOT NULL DEFAULT '', modalities TEXT NOT NULL DEFAULT '', domain_set TEXT NOT NULL DEFAULT '', online INTEGER NOT NULL DEFAULT 0);
CREATE VIRTUAL TABLE agents_fts USING fts5(agent_id UNINDEXED, body, tokenize='porter unicode61');
CREATE TABLE 'agents_fts_config'(k PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE 'agents_fts_content'(id INTEGER PRIMARY KEY, c0, c1);
CREATE TABLE 'agents_fts_data'(id INTEGER PRIMARY KEY, block BLOB);
CREATE TABLE 'agents_fts_docsize'(id INTEGER PRIMARY KEY, sz BLOB);
CREATE TABLE 'agents_fts_idx'(segid, term, pgno, PRIMARY KEY(segid, term)) WITHOUT ROWID;
CREATE TABLE capabilities (agent_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
                                   cooperation TEXT NOT NULL, description TEXT, tags TEXT,
                                   PRIMARY KEY (agent_id, name));
CREATE TABLE domains (agent_id TEXT NOT NULL, domain TEXT NOT NULL, PRIMARY KEY (agent_id, domain));
CREATE TABLE sensors (agent_id TEXT NOT NULL, name TEXT NOT NULL, modality TEXT NOT NULL, unit TEXT,
                              rate_hz REAL, PRIMARY KEY (agent_id, name));
CREATE TABLE status (agent_id TEXT PRIMARY KEY, online INTEGER NOT NULL, epoch INTEGER NOT NULL,
                             updated REAL NOT NULL);
CREATE INDEX agents_load ON agents(load_queue, agent_id);
CREATE INDEX capabilities_kind ON capabilities(kind);
CREATE INDEX domains_domain ON domains(domain);
CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
CREATE INDEX sensors_modality ON sensors(modality);
