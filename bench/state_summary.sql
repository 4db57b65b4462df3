-- state_summary.sql - a fingerprint of what rosterd wrote, without the
-- values that differ from run to run (generated ids, times, barcodes):
-- counts per outcome, activity kind, history field, match and status, and
-- md5 digests of contacts, bookings, attendees, activity and field history
-- with contacts named by their email. Two runs on the same seed and the
-- same published events (publish_events.py is seeded) must print the same
-- lines whatever the rosterd version, if the change kept the behaviour:
--
--   psql -X -At -d rosterd -f bench/state_summary.sql > a.txt   # then diff
--
-- (docs/performance.md: the base commit and this branch, 3,000 events:
-- identical.)
SELECT 'msg', outcome, count(*)::text FROM rd.messages GROUP BY 2
UNION ALL SELECT 'act', kind, count(*)::text FROM rd.activity GROUP BY 2
UNION ALL SELECT 'hist', field, count(*) || '/' || count(old_value) FROM rd.field_history GROUP BY 2
UNION ALL SELECT 'bk', match || ':' || status, count(*)::text FROM rd.bookings GROUP BY 2
UNION ALL SELECT 'att', match || ':' || status, count(*)::text FROM rd.attendees GROUP BY 2
UNION ALL SELECT 'contacts', 'md5', md5(string_agg(concat_ws('|', org, email, first_name, last_name, company, language, phone, street, zip, city, country, birthdate, fields::text, value_at::text, created_by IS NULL), ',' ORDER BY org, email, first_name, last_name, phone)) FROM rd.contacts
UNION ALL SELECT 'bookings', 'md5', md5(string_agg(concat_ws('|', b.org, b.booking_id, b.offer_id, b.number, b.status, b.version, b.email, b.match, b.total, b.currency, b.data_status, b.data_version, b.list_version, b.cancel_version, b.booker::text, c.email, b.message_id), ',' ORDER BY b.org, b.booking_id)) FROM rd.bookings b LEFT JOIN rd.contacts c ON c.org = b.org AND c.contact_id = b.contact_id
UNION ALL SELECT 'attendees', 'md5', md5(string_agg(concat_ws('|', a.org, a.booking_id, a.attendee_id, a.email, a.first_name, a.last_name, a.category, a.price, a.status, a.match, a.person::text, a.version, c.email), ',' ORDER BY a.org, a.booking_id, a.attendee_id)) FROM rd.attendees a LEFT JOIN rd.contacts c ON c.org = a.org AND c.contact_id = a.contact_id
UNION ALL SELECT 'activity', 'md5', md5(string_agg(concat_ws('|', a.org, a.kind, a.summary, a.message_id, c.email), ',' ORDER BY a.org, a.message_id, a.kind, a.summary)) FROM rd.activity a LEFT JOIN rd.contacts c ON c.org = a.org AND c.contact_id = a.contact_id
UNION ALL SELECT 'history', 'md5', md5(string_agg(concat_ws('|', h.org, h.field, h.old_value, h.new_value, h.message_id, c.email), ',' ORDER BY h.org, h.message_id, h.field, c.email)) FROM rd.field_history h LEFT JOIN rd.contacts c ON c.org = h.org AND c.contact_id = h.contact_id
ORDER BY 1, 2;
