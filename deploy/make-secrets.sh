#!/bin/sh
# Makes the compose stack's secret files under ./secrets (or the folder given), once:
#   postgres_password        the database password (the postgres service reads it)
#   reid_database_url        the DSN with that password (REID_SECRETS_DIR=/run/secrets in
#                            the reid services; streams/settings.py reads it as REID_DATABASE_URL)
#   grafana_admin_password   Grafana's admin password (no admin/admin default)
# Existing files are kept, so running it again changes nothing. The folder is private (0700);
# the files are readable (0644) so that the non-root containers can read their bind mount.
set -eu
dir="${1:-$(dirname "$0")/../secrets}"
mkdir -p "$dir"
chmod 0700 "$dir"
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
write() {  # write NAME VALUE: only if missing
    if [ ! -s "$dir/$1" ]; then
        (umask 022 && printf '%s' "$2" > "$dir/$1")
        echo "secrets: wrote $dir/$1"
    fi
}
write postgres_password "$(random)"
write reid_database_url "postgresql://reid:$(cat "$dir/postgres_password")@postgres:5432/reid"
write grafana_admin_password "$(random)"
echo "secrets: Grafana admin password: cat $dir/grafana_admin_password"
