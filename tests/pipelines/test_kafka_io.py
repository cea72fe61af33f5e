"""Kafka connection and SASL/SSL settings reach every client shoprec creates."""

from __future__ import annotations

from pipelines import kafka_io
from pipelines.settings import Settings


def _client_settings(bootstrap: str, protocol: str) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, kafka_security_protocol=protocol, kafka_sasl_mechanism="SCRAM-SHA-512",
                    kafka_sasl_username="alice", kafka_sasl_password="s3cret",
                    kafka_ssl_cafile="/etc/ssl/certs/ca-certificates.crt")


def _assert_passed_through(config: dict, bootstrap: str, protocol: str) -> None:
    assert config["bootstrap_servers"] == bootstrap.split(",")
    assert config["security_protocol"] == protocol
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "alice"
    assert config["sasl_plain_password"] == "s3cret"
    assert config["ssl_cafile"] == "/etc/ssl/certs/ca-certificates.crt"


def test_sasl_ssl_settings_reach_producer_and_consumer():
    s = _client_settings("10.0.0.1:9093,10.0.0.2:9093", "SASL_SSL")
    producer = kafka_io.make_producer(s, api_version=(2, 6))  # a given api_version: no connection at construction
    consumer = kafka_io.make_consumer(s, api_version=(2, 6))
    try:
        _assert_passed_through(producer.config, "10.0.0.1:9093,10.0.0.2:9093", "SASL_SSL")
        _assert_passed_through(consumer.config, "10.0.0.1:9093,10.0.0.2:9093", "SASL_SSL")
    finally:
        producer.close(timeout=0)
        consumer.close()


def test_settings_reach_the_admin_client_and_all_clients_work_on_the_broker(broker):
    # the local broker speaks PLAINTEXT only; the SASL fields still travel with every client's config
    s = _client_settings(broker, "PLAINTEXT")
    admin = kafka_io.make_admin(s)
    try:
        _assert_passed_through(admin.config, broker, "PLAINTEXT")
    finally:
        admin.close()
    kafka_io.ensure_topics(s)  # the admin built from these settings really talks to the broker
    consumer = kafka_io.make_consumer(s, group="kwargs-check")
    try:
        _assert_passed_through(consumer.config, broker, "PLAINTEXT")
        assert consumer.partitions_for_topic(s.kafka_topic_events)
    finally:
        consumer.close()


def test_sasl_ssl_settings_reach_the_librdkafka_impression_producer():
    s = _client_settings("10.0.0.1:9093,10.0.0.2:9093", "SASL_SSL")
    conf = kafka_io.librdkafka_config(s)
    assert conf == {"bootstrap.servers": "10.0.0.1:9093,10.0.0.2:9093", "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "alice", "sasl.password": "s3cret",
                    "ssl.ca.location": "/etc/ssl/certs/ca-certificates.crt"}
    # librdkafka checks names and values when the client is built: a misspelt or unsupported one raises here
    producer = kafka_io.make_impression_producer(s)
    assert len(producer) == 0


def test_the_impression_producer_says_a_broker_outage_once_not_twice_a_second(caplog):
    """While Kafka was down each API process logged librdkafka's connection failure ~130 times a minute."""
    import logging
    import time

    from pipelines import localstack

    caplog.set_level(logging.WARNING, logger=kafka_io.librdkafka_log.name)
    producer = kafka_io.make_impression_producer(Settings(kafka_bootstrap=f"127.0.0.1:{localstack.free_port()}"))
    producer.produce("shop.events", b"{}")
    started = time.monotonic()

    def fails() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == kafka_io.librdkafka_log.name]

    while time.monotonic() - started < 8:  # librdkafka retries every 0.1-2 s: several failed connects
        producer.poll(0.2)
    said = fails()
    assert said and "Connection refused" in said[0], said  # the outage is said...
    assert len(said) == 1, said  # ...once, not once per reconnect
    producer.purge()
