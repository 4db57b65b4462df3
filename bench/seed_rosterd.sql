-- seed_rosterd.sql - the benchmark's starting point for rosterd, the same
-- as ../shared/bench/seed.sql gives the peer: 100,000 contacts
-- user<k>@example.org in organisation org-<k % 10 + 1>, plus the offers
-- offer-1 .. offer-49 that the published events refer to, in every org.
INSERT INTO rd.orgs (org, name, sync_contacts, language, message_id)
SELECT 'org-' || o, 'Organisation ' || o, false, 'de', 'seed'
  FROM generate_series(1, 10) AS o
ON CONFLICT DO NOTHING;
INSERT INTO rd.offers (org, offer_id, title, currency, message_id)
SELECT 'org-' || o, 'offer-' || f, 'Course ' || f, 'CHF', 'seed'
  FROM generate_series(1, 10) AS o, generate_series(1, 49) AS f
ON CONFLICT DO NOTHING;
INSERT INTO rd.contacts (org, email, first_name, last_name, language, message_id)
SELECT 'org-' || (k % 10 + 1), 'user' || k || '@example.org', 'First' || k, 'Last' || k, 'de',
       'seed'
  FROM generate_series(1, 100000) AS k;
-- Only the seeded tables: an empty table that VACUUM has seen is planned
-- as empty (PostgreSQL 14+ trusts reltuples = 0), so the first plans of
-- the lookups on bookings, attendees and field_history would be sequential
-- scans that stay cached while the tables grow (quadratic until autovacuum
-- analyses them). A fresh rosterd database has never-vacuumed tables.
VACUUM ANALYZE rd.orgs, rd.offers, rd.contacts;
CHECKPOINT;
