"""Queues, agents, allocation strategies, SLA and recycling. Decisions live in pure modules
(`allocate.policy`); the allocator loop and the outbox relay wrap them with database I/O."""
