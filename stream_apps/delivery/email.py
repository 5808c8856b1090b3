"""E-mail to officers: smtplib in its own small thread pool, a plain-text and an HTML part.

A hung SMTP server must not starve the threads ClickHouse calls run in, hence the dedicated pool.
STARTTLS (or SMTPS) and login when configured, and a Message-ID derived from (alert, officer, channel)
so a resend after a crash can be recognised by mail systems. A password is never sent over an
unencrypted connection: :class:`SmtpConfig` refuses it. The sender returns a
:class:`~.results.SendResult` instead of raising.
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from functools import partial

from synthwatch.errors import SynthwatchError
from synthwatch.settings import Settings
from synthwatch.stream_apps.delivery.messages import Message
from synthwatch.stream_apps.delivery.results import SendResult


class SmtpConfigError(SynthwatchError, ValueError):
    """An SMTP configuration that would leak the password; the message says what to set instead."""


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The SMTP server (from settings); ``ssl_context`` lets tests and private CAs verify the certificate.

    ``ssl``: SMTPS (TLS from the first byte, port 465); ``starttls``: upgrade a plain connection (587).
    With a password, one of the two is required: a login over plain text is refused at construction.
    """

    host: str
    port: int = 587
    starttls: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, a log line or a traceback's locals
    sender: str = "synthwatch@localhost"
    ssl_context: ssl.SSLContext | None = None
    ssl: bool = False

    def __post_init__(self) -> None:
        if (self.username or self.password) and not (self.starttls or self.ssl):
            raise SmtpConfigError(
                f"SMTP login to {self.host}:{self.port} without TLS would send the password in clear: set "
                "SYNTHWATCH_SMTP_STARTTLS=true (port 587) or SYNTHWATCH_SMTP_SSL=true (port 465), "
                "or remove SYNTHWATCH_SMTP_USERNAME/PASSWORD for a relay that needs no login"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpConfig | None:
        if not settings.smtp_host:
            return None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            starttls=settings.smtp_starttls and not settings.smtp_ssl,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            sender=settings.smtp_sender,
            ssl=settings.smtp_ssl,
        )


def build_email(
    message: Message, *, sender: str, to: Sequence[str], message_id: str, headers: Mapping[str, str] | None = None
) -> EmailMessage:
    """A multipart/alternative e-mail: the plain text first, the HTML as the preferred alternative."""
    email = EmailMessage()
    email["Subject"] = message.subject
    email["From"] = sender
    email["To"] = ", ".join(to)
    email["Date"] = formatdate(usegmt=True)
    domain = sender.rsplit("@", 1)[-1] or "synthwatch.invalid"
    email["Message-ID"] = f"<{message_id}@{domain}>"
    email["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a robot
    for name, value in (headers or {}).items():
        email[name] = value
    email.set_content(message.text)
    email.add_alternative(message.html, subtype="html")
    email["Content-Language"] = message.language  # after the parts: making them moves Content-* headers down
    return email


def message_id(*parts: str) -> str:
    """Same (alert, officer, channel) -> same Message-ID, so a resend after a crash is recognisable."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class SmtpSender:
    """Sends through smtplib in a dedicated thread pool; one connection per message (alerts are rare)."""

    def __init__(self, config: SmtpConfig, max_connections: int = 4) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="synthwatch-smtp")

    async def send(self, email: EmailMessage, timeout_s: float) -> SendResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._send, email, timeout_s))

    def _send(self, email: EmailMessage, timeout_s: float) -> SendResult:
        c = self.config
        recipients = [a.strip() for a in str(email["To"]).split(",") if a.strip()]
        try:
            context = c.ssl_context or ssl.create_default_context()
            connection = (
                smtplib.SMTP_SSL(c.host, c.port, timeout=timeout_s, context=context)
                if c.ssl
                else smtplib.SMTP(c.host, c.port, timeout=timeout_s)
            )
            with connection as smtp:
                smtp.ehlo()
                if c.starttls and not c.ssl:
                    smtp.starttls(context=context)  # raises when the server does not offer it: no plain fallback
                    smtp.ehlo()
                if c.username:
                    smtp.login(c.username, c.password or "")
                code, reply = smtp.mail(c.sender)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, c.sender)
                refused = {}
                for address in recipients:
                    code, reply = smtp.rcpt(address)
                    if code not in (250, 251):
                        refused[address] = (code, reply)
                if len(refused) == len(recipients):
                    smtp.rset()
                    raise smtplib.SMTPRecipientsRefused(refused)
                code, reply = smtp.data(email.as_bytes(policy=SMTP_POLICY))
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
        except smtplib.SMTPRecipientsRefused as error:
            codes = [code for code, _ in error.recipients.values()]
            worst = max(codes)
            listed = "; ".join(f"{a}: {code} {r.decode(errors='replace')}" for a, (code, r) in error.recipients.items())
            return SendResult(
                False, worst, f"recipients refused: {listed}", retryable=all(400 <= x < 500 for x in codes)
            )
        except smtplib.SMTPResponseException as error:
            raw = error.smtp_error
            said = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            permanent = not 400 <= error.smtp_code < 500
            return SendResult(False, error.smtp_code, f"SMTP {error.smtp_code}: {said}", retryable=not permanent)
        except smtplib.SMTPNotSupportedError as error:
            return SendResult(
                False, None, f"server does not support it: {error} (check SYNTHWATCH_SMTP_STARTTLS / SMTP_SSL)"
            )
        except ssl.SSLError as error:
            return SendResult(False, None, f"TLS failed: {error}")
        except (smtplib.SMTPException, OSError) as error:
            return SendResult(False, None, f"{type(error).__name__}: {error}", retryable=True)
        text = reply.decode(errors="replace")
        if refused:
            listed = "; ".join(f"{a}: {code}" for a, (code, _) in refused.items())
            return SendResult(True, code, f"SMTP {code}: {text}; refused: {listed}")
        return SendResult(True, code, f"SMTP {code}: {text}")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
