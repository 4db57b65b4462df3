"""test_transport.py - SPEC 8 transport options: quorum queues (with a
delivery limit) and several broker URLs for fail-over."""
import harness
from harness import free_port, make_msg, wait_for, wait_messages


def test_quorum_queues(rosterd, publish, db, amqp, servers):
    rosterd(queue_type="quorum", delivery_limit=5)
    out = servers.rabbitmqctl("list_queues", "name", "type", "arguments")
    lines = [l for l in out.splitlines() if l.startswith(amqp.names.prefix)]
    events = [l for l in lines if l.split("\t")[0] == amqp.names.queue]
    assert events and "quorum" in events[0] and "x-delivery-limit" in events[0]
    m = make_msg("org.configured", {"name": "Q"})
    publish(m)
    wait_messages(db, 1)
    # a waiting message goes through a quorum retry queue too
    publish(make_msg("booking.created", {"booking_id": "b", "version": 1, "offer_id": "o",
                                         "booker": {"email": "q@example.org"}}))
    wait_for(lambda: any(l.split("\t")[0].startswith(amqp.names.retry_queue) and "quorum" in l
                         for l in servers.rabbitmqctl("list_queues", "name", "type")
                         .splitlines()), 15, message="a quorum retry queue")


def test_failover_to_second_url(rosterd, publish, db, servers):
    dead = "amqp://guest:guest@127.0.0.1:%d/%%2f" % free_port()
    rd = rosterd(url="%s %s" % (dead, servers.amqp_url))
    m = make_msg("org.configured", {"name": "F"})
    publish(m)
    wait_messages(db, 1)
    assert "amqp.connect_failed" in rd.log_text() or "amqp.connected" in rd.log_text()
    assert rd.alive
