"""CLI commands of the HTTP intake gateway: ``synthwatch gateway`` and ``synthwatch tokens create|revoke|list``.

Kept out of ``cli.py`` (mounted with :func:`register`) so the gateway stays one module set to review.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from synthwatch.consoles import command_console
from synthwatch.redaction import redact
from synthwatch.settings import Settings
from synthwatch.terminal import plain, say

console = command_console()
err = command_console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    say(err, "[bold red]error:[/] ", redact(message))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``gateway`` and ``tokens create|revoke|list`` to the ``synthwatch`` app."""
    tokens_app = typer.Typer(no_args_is_help=True, help="Bearer tokens of the HTTP intake gateway (stored hashed).")
    app.add_typer(tokens_app, name="tokens")

    @app.command()
    def gateway(
        openapi: Annotated[bool, typer.Option("--openapi", help="Print the OpenAPI description and exit.")] = False,
    ) -> None:
        """Serve the HTTP intake (POST /v1/reports: NDJSON, JSON or CSV) for organisations without Kafka clients.

        Address, limits and TLS: SYNTHWATCH_GATEWAY_* settings; tokens: `synthwatch tokens create`.
        """
        from synthwatch.kafka_clients import KafkaConnectError, KafkaSecurityError
        from synthwatch.producers.gateway import GatewayConfigError, openapi_document, serve
        from synthwatch.producers.gateway_tokens import TokenStoreError
        from synthwatch.schemas.envelope import OrgKeysError
        from synthwatch.stackfile import NoBrokerConfigured, bootstrap_servers

        settings = Settings()
        if openapi:
            sys.stdout.write(json.dumps(openapi_document(settings), indent=2) + "\n")
            return
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            serve(settings, bootstrap_servers(settings), announce=lambda m: console.print(m, highlight=False))
        except (
            GatewayConfigError,
            TokenStoreError,
            OrgKeysError,
            NoBrokerConfigured,
            KafkaConnectError,
            KafkaSecurityError,
        ) as error:
            _fail(str(error))

    @tokens_app.command("create")
    def tokens_create(
        org: Annotated[str, typer.Option("--org", help="Organisation id (as in the organisation keys file).")],
        lab_id: Annotated[list[str] | None, typer.Option("--lab-id", help="A lab_id it may report as.")] = None,
        agency: Annotated[list[str] | None, typer.Option("--agency", help="An agency it may report as.")] = None,
        note: Annotated[str, typer.Option(help="Who holds it (shown by `tokens list`).")] = "",
    ) -> None:
        """Create a token and print it ONCE (only its hash is stored): hand it to the organisation securely.

        With SYNTHWATCH_ORG_KEYS_FILE set, the organisation must be in it and the lab ids / agencies default to
        (and must be among) the ones it lists, so the worker accepts what the gateway signs.
        """
        from synthwatch.producers.gateway_tokens import TokenStore, TokenStoreError
        from synthwatch.schemas.envelope import OrgKeysError, load_org_keys

        settings = Settings()
        labs, agencies = list(lab_id or []), list(agency or [])
        if settings.org_keys_file is not None:
            try:
                known = load_org_keys(settings.org_keys_file).get(org)
            except OrgKeysError as error:
                _fail(str(error))
            if known is None:
                _fail(f"organisation {org!r} is not in {settings.org_keys_file}: add its key there first")
            if not labs and not agencies:
                labs, agencies = sorted(known.lab_ids), sorted(known.agencies)
            outside = [x for x in labs if x not in known.lab_ids] + [x for x in agencies if x not in known.agencies]
            if outside:
                _fail(f"{org!r} may not report as {', '.join(map(repr, outside))} in {settings.org_keys_file}")
        try:
            token, secret = TokenStore.open(settings.resolved_gateway_tokens_file).create(org, labs, agencies, note)
        except TokenStoreError as error:
            _fail(str(error))
        say(err, f"token {token.token_id} for organisation ", token.org_id, " (lab ids: ",
            ", ".join(token.lab_ids) or "-", "; agencies: ", ", ".join(token.agencies) or "-",
            "). It is shown once; only its hash is kept:")  # fmt: skip
        sys.stdout.write(secret + "\n")

    @tokens_app.command("revoke")
    def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The id shown by `tokens list`.")]) -> None:
        """Revoke a token: the running gateway refuses it from its next request on."""
        from synthwatch.producers.gateway_tokens import TokenStore, TokenStoreError

        try:
            token = TokenStore.open(Settings().resolved_gateway_tokens_file).revoke(token_id)
        except TokenStoreError as error:
            _fail(str(error))
        say(console, f"token {token.token_id} of ", token.org_id, f" revoked at {token.revoked}")

    @tokens_app.command("list")
    def tokens_list() -> None:
        """List tokens (ids, organisations, bindings, state): never a secret or a hash."""
        from synthwatch.producers.gateway_tokens import TokenStore, TokenStoreError

        try:
            store = TokenStore.open(Settings().resolved_gateway_tokens_file)
        except TokenStoreError as error:
            _fail(str(error))
        if not store.tokens:
            console.print(f"No tokens in {store.path}. Create one with `synthwatch tokens create --org ORG`.")
            return
        table = Table()
        for column in ("id", "organisation", "lab ids", "agencies", "created", "state", "note"):
            table.add_column(column)
        for token in store.tokens.values():
            state = "active" if token.active else f"revoked {token.revoked}"
            table.add_row(
                token.token_id,
                plain(token.org_id),
                plain(", ".join(token.lab_ids)),
                plain(", ".join(token.agencies)),
                token.created,
                state,
                plain(token.note),
            )
        console.print(table)
