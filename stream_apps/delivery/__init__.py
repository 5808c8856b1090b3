"""Alerts to liaison officers: subscriptions, messages in their language, webhooks and e-mail, the
delivery service. It may import the floor, ``detect`` and ``storage``.
"""
