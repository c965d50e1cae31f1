-- 001: the database every tally table lives in.
CREATE DATABASE IF NOT EXISTS {db};
