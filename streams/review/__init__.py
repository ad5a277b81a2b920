"""The review page (`reid-stream review`): a small web app a person uses to go through the
decisions the stream flagged as close, and to merge and split deer (docs/curation.md).

``server`` (HTTP, routes, the actions), ``pages`` (what each page shows, rendered from the
Jinja templates in ``templates/``), ``security`` (sessions, CSRF tokens, the access token,
the loopback rule). Every action calls ``streams.curation.Curator``, the same calls as
`reid-stream deer ...`; the page itself holds no SQL.
"""
