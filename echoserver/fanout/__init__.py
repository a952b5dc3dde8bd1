"""Fan-out: channel membership, publishing through a broker, and the deliveries every
receiver of one message shares.

It knows subscribers, not frames: it may import brokers and the leaves, never wire,
transport or anything above. A broker's failure reaches callers as the broker's own
brokers.BrokerUnavailable, untranslated.
"""
