-- Statements of `rosterctl ledger` (cli/ledger.c). $1 is the organisation,
-- or NULL for all of them. docs/ledger.md describes the checks.

-- name: ledger_begin
BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: ledger_end
COMMIT

-- name: ledger_check
-- One row per mismatch: check, org, currency, subject, expected, found.
-- The ledger (rd.transactions) is compared with report.balances and with
-- what the documents say it must hold (rd.invoices, rd.payments), per
-- organisation and currency, per invoice and per payment.
WITH tx AS (SELECT * FROM rd.transactions WHERE $1::text IS NULL OR org = $1),
     inv AS (SELECT * FROM rd.invoices WHERE $1::text IS NULL OR org = $1),
     pay AS (SELECT * FROM rd.payments WHERE $1::text IS NULL OR org = $1),
     tx_total AS (SELECT org, currency, sum(amount) AS s FROM tx GROUP BY org, currency),
     bal_total AS (SELECT org, currency, sum(balance) AS s FROM report.balances
		    WHERE $1::text IS NULL OR org = $1 GROUP BY org, currency),
     doc_total AS (SELECT org, currency, sum(a) AS s
		     FROM (SELECT org, currency, -amount AS a FROM inv
			   UNION ALL SELECT org, currency, amount FROM inv WHERE status = 'cancelled'
			   UNION ALL SELECT org, currency, amount FROM pay
			   UNION ALL SELECT org, currency, amount FROM tx WHERE kind = 'manual') d
		    GROUP BY org, currency),
     paid AS (SELECT org, invoice_id, sum(amount) AS s, count(*) AS n FROM pay
	       GROUP BY org, invoice_id),
     -- the derived rows per document, aggregated in one pass (a lateral
     -- subquery per invoice over the materialised tx was O(invoices x
     -- transactions): 20,000 events took over 30 s and hit statement_timeout)
     tx_inv AS (SELECT org, invoice_id, kind, count(*) AS n,
		       string_agg(format('%s %s for contact %s', amount, currency, contact_id), '; '
				  ORDER BY transaction_id) AS rows,
		       min(amount) AS amin, max(amount) AS amax,
		       min(currency) AS cmin, max(currency) AS cmax,
		       min(contact_id::text) AS kmin, max(contact_id::text) AS kmax
		  FROM tx WHERE kind IN ('invoice', 'cancellation')
		 GROUP BY org, invoice_id, kind),
     tx_pay AS (SELECT org, payment_id, count(*) AS n,
		       string_agg(format('%s %s on invoice %s for contact %s', amount, currency,
					 invoice_id, contact_id), '; ' ORDER BY transaction_id) AS rows,
		       min(amount) AS amin, max(amount) AS amax,
		       min(currency) AS cmin, max(currency) AS cmax,
		       min(invoice_id) AS imin, max(invoice_id) AS imax,
		       bool_or(invoice_id IS NULL) AS inull,
		       min(contact_id::text) AS kmin, max(contact_id::text) AS kmax
		  FROM tx WHERE kind = 'payment'
		 GROUP BY org, payment_id)
SELECT 'balances' AS check_name, org, currency, 'sum of report.balances' AS subject,
       coalesce(t.s, 0)::text AS expected, coalesce(b.s, 0)::text AS found
  FROM tx_total t FULL JOIN bal_total b USING (org, currency)
 WHERE coalesce(t.s, 0) <> coalesce(b.s, 0)
UNION ALL
SELECT 'transactions', org, currency,
       'sum of transactions (invoices, payments, cancellations, manual)',
       coalesce(d.s, 0)::text, coalesce(t.s, 0)::text
  FROM doc_total d FULL JOIN tx_total t USING (org, currency)
 WHERE coalesce(d.s, 0) <> coalesce(t.s, 0)
UNION ALL
SELECT 'invoice_paid', i.org, i.currency, 'invoice ' || i.invoice_id,
       format('paid = sum of its %s payments = %s', coalesce(p.n, 0), coalesce(p.s, 0)),
       i.paid::text
  FROM inv i LEFT JOIN paid p ON p.org = i.org AND p.invoice_id = i.invoice_id
 WHERE i.paid <> coalesce(p.s, 0)
UNION ALL
SELECT 'invoice_status', i.org, i.currency, 'invoice ' || i.invoice_id,
       CASE WHEN i.cancel_message_id IS NOT NULL THEN 'cancelled'
	    WHEN i.paid = 0 THEN 'open' WHEN i.paid < i.amount THEN 'partial' ELSE 'paid' END
       || format(' (amount %s, paid %s)', i.amount, i.paid),
       i.status
  FROM inv i
 WHERE i.status <> CASE WHEN i.cancel_message_id IS NOT NULL THEN 'cancelled'
			WHEN i.paid = 0 THEN 'open' WHEN i.paid < i.amount THEN 'partial'
			ELSE 'paid' END
UNION ALL
SELECT 'invoice_transaction', i.org, i.currency, 'invoice ' || i.invoice_id,
       format('one invoice row of %s %s for contact %s', -i.amount, i.currency, i.contact_id),
       coalesce(t.rows, 'none')
  FROM inv i
  LEFT JOIN tx_inv t ON t.org = i.org AND t.invoice_id = i.invoice_id AND t.kind = 'invoice'
 WHERE coalesce(t.n, 0) <> 1
    OR NOT (t.amin = -i.amount AND t.amax = -i.amount AND t.cmin = i.currency
	    AND t.cmax = i.currency AND t.kmin = i.contact_id::text AND t.kmax = i.contact_id::text)
UNION ALL
SELECT 'cancellation_transaction', i.org, i.currency, 'invoice ' || i.invoice_id,
       CASE WHEN i.status = 'cancelled'
	    THEN format('one cancellation row of %s %s for contact %s', i.amount, i.currency,
			i.contact_id)
	    ELSE 'none (not cancelled)' END,
       coalesce(t.rows, 'none')
  FROM inv i
  LEFT JOIN tx_inv t
	 ON t.org = i.org AND t.invoice_id = i.invoice_id AND t.kind = 'cancellation'
 WHERE CASE WHEN i.status = 'cancelled'
	    THEN coalesce(t.n, 0) <> 1
		 OR NOT (t.amin = i.amount AND t.amax = i.amount AND t.cmin = i.currency
			 AND t.cmax = i.currency AND t.kmin = i.contact_id::text
			 AND t.kmax = i.contact_id::text)
	    ELSE coalesce(t.n, 0) <> 0 END
UNION ALL
SELECT 'payment_transaction', p.org, p.currency, 'payment ' || p.payment_id,
       format('one payment row of %s %s on invoice %s for contact %s', p.amount, p.currency,
	      p.invoice_id, i.contact_id),
       coalesce(t.rows, 'none')
  FROM pay p
  JOIN inv i ON i.org = p.org AND i.invoice_id = p.invoice_id
  LEFT JOIN tx_pay t ON t.org = p.org AND t.payment_id = p.payment_id
 WHERE coalesce(t.n, 0) <> 1
    OR NOT (t.amin = p.amount AND t.amax = p.amount AND t.cmin = p.currency
	    AND t.cmax = p.currency AND NOT t.inull AND t.imin = p.invoice_id
	    AND t.imax = p.invoice_id AND t.kmin = i.contact_id::text
	    AND t.kmax = i.contact_id::text)
UNION ALL
SELECT 'payment_currency', p.org, p.currency, 'payment ' || p.payment_id,
       'the currency of invoice ' || p.invoice_id || ': ' || i.currency, p.currency
  FROM pay p
  JOIN inv i ON i.org = p.org AND i.invoice_id = p.invoice_id
 WHERE p.currency <> i.currency
UNION ALL
SELECT 'contact', x.org, x.currency, 'transaction ' || x.transaction_id,
       'a live contact (not merged)', 'contact ' || x.contact_id || ' merged into '
       || c.merged_into
  FROM tx x
  JOIN rd.contacts c ON c.org = x.org AND c.contact_id = x.contact_id
 WHERE c.merged_into IS NOT NULL
ORDER BY 1, 2, 3, 4

-- name: ledger_totals
-- Per organisation and currency: transactions, invoices, payments, and the
-- sum of the balances.
SELECT org, currency, sum(n_tx)::text, sum(n_inv)::text, sum(n_pay)::text, sum(a)::text
  FROM (SELECT org, currency, 1 AS n_tx, 0 AS n_inv, 0 AS n_pay, amount AS a
	  FROM rd.transactions WHERE $1::text IS NULL OR org = $1
	UNION ALL
	SELECT org, currency, 0, 1, 0, 0 FROM rd.invoices WHERE $1::text IS NULL OR org = $1
	UNION ALL
	SELECT org, currency, 0, 0, 1, 0 FROM rd.payments WHERE $1::text IS NULL OR org = $1) u
 GROUP BY org, currency
 ORDER BY org, currency
