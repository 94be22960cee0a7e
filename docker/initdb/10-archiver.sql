-- The archiver's role: replication (stream, backups) and reading statistics (slot and
-- database sizes for its checks and metrics). Demonstration password: change it.
CREATE ROLE archiver LOGIN REPLICATION PASSWORD 'archiver';
GRANT pg_read_all_stats TO archiver;
GRANT pg_monitor TO archiver;
