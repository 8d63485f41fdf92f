-- leadflow: the data team's PostgreSQL role for staging extracts (README, "Staging extracts").
--
-- What the role may do, and nothing else:
--   * create tables in schema `staging`, fill them, change and drop its own tables there;
--   * register an extract: INSERT INTO staging.extracts (table_name, source, event_type,
--     business_line, segment, priority, campaign) -- not its state, counters or checkpoint;
--   * read staging.extracts and staging.extract_rejects, to follow its extracts and see the
--     rejected rows (its own data) with their reasons.
-- It cannot read or write leadflow's tables (customers, leads, events, agents, tokens, ...),
-- change or delete manifest rows, or create anything outside `staging`.
-- The tables it creates are readable by leadflow's loader (the owner of staging.extracts,
-- i.e. the role leadflow runs its migrations as) through default privileges.
--
-- Run once per database, as a superuser, after `leadflow db upgrade`; running it again is
-- harmless. The role is created with LOGIN and no password; set one afterwards:
--
--   psql "$DATABASE_URL" -f deploy/sql/staging_role.sql
--   psql "$DATABASE_URL" -c "ALTER ROLE leadflow_staging PASSWORD '...'"
--
-- Another name: run `SET leadflow.staging_role = 'data_team';` in the same session first.
-- People with their own logins: GRANT leadflow_staging TO alice; and
-- ALTER ROLE alice SET role = 'leadflow_staging'; so that the tables she creates belong to the
-- role (and so are readable by the loader).
-- Not covered by this file: PUBLIC's default rights every role has (CONNECT, TEMPORARY tables,
-- EXECUTE on functions; CREATE in schema public before PostgreSQL 15) -- revoke those from
-- PUBLIC database-wide if your policy requires it.

DO $$
DECLARE
    staging_role text := coalesce(nullif(current_setting('leadflow.staging_role', true), ''),
                                  'leadflow_staging');
    loader text;
BEGIN
    SELECT tableowner INTO loader
    FROM pg_tables WHERE schemaname = 'staging' AND tablename = 'extracts';
    IF loader IS NULL THEN
        RAISE EXCEPTION 'staging.extracts does not exist in database %: run `leadflow db upgrade` first',
            current_database();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = staging_role) THEN
        EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION'
                       ' NOBYPASSRLS', staging_role);
    END IF;

    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), staging_role);
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA staging TO %I', staging_role);
    EXECUTE format('GRANT INSERT (table_name, source, event_type, business_line, segment,'
                   ' priority, campaign) ON staging.extracts TO %I', staging_role);
    EXECUTE format('GRANT SELECT ON staging.extracts, staging.extract_rejects TO %I',
                   staging_role);
    -- The loader reads whatever the role creates in staging (and never writes to it).
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA staging'
                   ' GRANT SELECT ON TABLES TO %I', staging_role, loader);
END
$$;
