#!/usr/bin/env bash
# edgecoop deployment on Debian 12 / Raspberry Pi OS bookworm / Ubuntu (Jetson). Idempotent: run it again after
# adding an agent config or pulling a new version. Run as root. Step-by-step guide: docs/deployment.md.
#
#   sudo systemd/install.sh                    everything on this machine: broker, orchestrator, CMS, dashboard, agents
#   sudo systemd/install.sh --agent-node       agents only; the broker runs elsewhere (set EDGECOOP_BROKER)
#   sudo systemd/install.sh --add-user NAME    on the broker host: create MQTT user NAME (an agent id) and its credentials
#   systemd/install.sh --print-broker-config   print the Mosquitto config this script installs (no root needed)
#   systemd/install.sh --print-acl             print the ACL this script installs (no root needed)
#   sudo systemd/install.sh --make-certs       only the TLS files: a CA and the broker's certificate, when missing
#
# Staging and tests (combine with the above):
#   --root DIR     write every file under DIR instead of / (DESTDIR; env DESTDIR too). The files keep their final
#                  paths inside (/etc/edgecoop/..., /opt/edgecoop/...); systemctl is never run.
#   --no-system    change nothing outside the files: no apt, no useradd/usermod, no virtualenv/pip, no systemctl;
#                  ownership is set only where this user can (as root, and when the group exists). No root needed.
#
# What it does (each step is safe to repeat):
#   1. apt: python3-venv, mosquitto, mosquitto-clients, openssl                     (EDGECOOP_NO_APT=1 skips)
#   2. system user `edgecoop` (home /var/lib/edgecoop), added to the device groups that exist (video, render, ...)
#   3. /opt/edgecoop/.venv with edgecoop installed from this checkout                (EDGECOOP_EXTRAS=llm,vision ...)
#   4. /etc/edgecoop: edgecoop.env (broker URL, CA file, dashboard address), orchestrator.toml, credentials/,
#      agent.toml.example; everything the units read exists after this step
#   5. broker (not with --agent-node):
#        /etc/mosquitto/conf.d/edgecoop.conf  from `edgecoop broker --print-config production` (MQTT on 1883,
#                                             MQTT over TLS on 8883, websockets on 9001)
#        /etc/mosquitto/certs/edgecoop-server.{crt,key}  the TLS listener's certificate, made with openssl when
#                                             missing (yours are kept), signed by a CA of this hub:
#        /etc/edgecoop/tls/ca.{crt,key}       that CA (the key stays here, 0600 root); /etc/edgecoop/ca.crt is its
#                                             certificate for clients (copy it to agent nodes: mqtts:// checks it)
#        /etc/mosquitto/edgecoop.acl          from `edgecoop broker --print-config acl` + Home Assistant lines
#        /etc/mosquitto/edgecoop.passwd       one mosquitto_passwd entry per user: orchestrator, cms, dashboard,
#                                             operator (for the edgecoop CLI), homeassistant and every agent
#                                             /etc/edgecoop/<agent-id>.toml
#      Passwords are generated once and kept in /etc/edgecoop/credentials/<user>.env (0640 root:edgecoop), which the
#      units read as EDGECOOP_USERNAME / EDGECOOP_PASSWORD. Existing users keep their passwords.
#   6. systemd units into /etc/systemd/system, the mosquitto.service drop-in, daemon-reload, enable (start is yours)
#
# Environment: EDGECOOP_SRC (checkout; default the one holding this script), EDGECOOP_HOME (/opt/edgecoop),
# EDGECOOP_EXTRAS (hub: dashboard; agent node: none), PYTHON (python3, must be >= 3.11), EDGECOOP_BROKER (hub: mqtt://127.0.0.1:<mqtt port>),
# EDGECOOP_TOPIC_PREFIX (edgecoop/v1), EDGECOOP_MQTT_PORT (1883), EDGECOOP_WS_PORT (9001),
# EDGECOOP_TLS_PORT (8883), EDGECOOP_TLS_NAMES (extra names in the broker's certificate, comma-separated, e.g.
# hub.example.org,192.168.1.10; default: the host name, <name>.local, localhost, 127.0.0.1, ::1 and this machine's
# addresses), EDGECOOP_DASHBOARD_PORT (8080), EDGECOOP_GROUP (edgecoop: the group that may read /etc/edgecoop),
# EDGECOOP_BIN (the edgecoop command used to generate configs; default the venv's).
set -euo pipefail

SRC=${EDGECOOP_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python3}
ROOT=${DESTDIR:-}
NO_SYSTEM=0
MODE=full
ADD_USER=
PRINT=
while [ $# -gt 0 ]; do
  case "$1" in
    --print-broker-config) PRINT=broker ;;
    --print-acl) PRINT=acl ;;
    --make-certs) MODE=certs ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --agent-node) MODE=agent ;;
    --add-user) MODE=add-user; ADD_USER=${2:?--add-user needs a user name (an agent id)}; shift ;;
    --root) ROOT=${2:?--root needs a directory}; shift ;;
    --root=*) ROOT=${1#--root=} ;;
    --no-system) NO_SYSTEM=1 ;;
    *) printf '[edgecoop] error: unknown option %s; see %s --help\n' "$1" "$0" >&2; exit 1 ;;
  esac
  shift
done
ROOT=${ROOT%/}
[ -z "$ROOT" ] || ROOT=$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)

# Final paths (what the units and config files say); every write goes to "$ROOT$path".
HOME_DIR=${EDGECOOP_HOME:-/opt/edgecoop}
VENV=$HOME_DIR/.venv
EXTRAS=${EDGECOOP_EXTRAS-__default__}
PREFIX=${EDGECOOP_TOPIC_PREFIX:-edgecoop/v1}
MQTT_PORT=${EDGECOOP_MQTT_PORT:-1883}
WS_PORT=${EDGECOOP_WS_PORT:-9001}
TLS_PORT=${EDGECOOP_TLS_PORT:-8883}
A2A_PORT=${EDGECOOP_A2A_PORT:-1884}
DASHBOARD_PORT=${EDGECOOP_DASHBOARD_PORT:-8080}
BROKER=${EDGECOOP_BROKER:-mqtt://127.0.0.1:$MQTT_PORT}
GROUP=${EDGECOOP_GROUP:-edgecoop}
ETC=/etc/edgecoop
CREDS=$ETC/credentials
MOSQ=/etc/mosquitto
MOSQ_MAIN=${EDGECOOP_MOSQUITTO_CONF:-$ROOT$MOSQ/mosquitto.conf}
UNITS=/etc/systemd/system
SERVICE_USERS=(orchestrator cms dashboard operator homeassistant a2a-gateway)

say() { printf '\033[1m[edgecoop]\033[0m %s\n' "$*"; }
die() { printf '[edgecoop] error: %s\n' "$*" >&2; exit 1; }
# heartbeat LABEL CMD...: run CMD with its output in a log; every 30 s say it is still running (elapsed time and
# its last line, e.g. "Building wheel for llama-cpp-python"), so a long compile is never silent; the log's tail on failure
heartbeat() {
  local label=$1 log pid start=$SECONDS n=0
  shift
  log=$(mktemp)
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    n=$((n + 1))
    if [ $((n % 30)) = 0 ]; then
      say "... $label: $((SECONDS - start)) s so far ($(tail -n 1 "$log" | cut -c1-100))"
    fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
edgecoop_bin() {
  if [ -n "${EDGECOOP_BIN:-}" ]; then echo "$EDGECOOP_BIN"
  elif [ -x "$ROOT$VENV/bin/edgecoop" ]; then echo "$ROOT$VENV/bin/edgecoop"
  else command -v edgecoop || die "no edgecoop command: run the full install first or set EDGECOOP_BIN"
  fi
}
# own OWNER:GROUP MODE PATH...: the mode always; the owner when we can (root, and the group exists or is a number)
own() {
  local owner=$1 mode=$2 group=${1#*:}
  shift 2
  chmod "$mode" "$@"
  if [ "$(id -u)" = 0 ] && { [[ $group =~ ^[0-9]+$ ]] || getent group "$group" >/dev/null; }; then
    chown "$owner" "$@"
  elif [ "$NO_SYSTEM" = 0 ]; then
    die "cannot give $* to $owner (not root, or no group $group)"
  fi
}

# -- generated broker files ---------------------------------------------------------------------------------------
# The generated production config is adapted to Debian's stock mosquitto.conf (Mosquitto 2.0.11):
#  * a `use_username_as_clientid` line before the first `listener` makes Mosquitto open an extra default listener
#    on 1883, which collides with `listener 1883` ("Address already in use"): it is moved under each listener;
#  * Debian's mosquitto.conf already sets persistence_location, and a second one is a fatal "Duplicate" error.
broker_config() {
  local drop_pl=0
  if [ -f "$MOSQ_MAIN" ] && grep -q '^persistence_location' "$MOSQ_MAIN"; then drop_pl=1; fi
  "$(edgecoop_bin)" broker --print-config production --port "$MQTT_PORT" --websockets-port "$WS_PORT" \
    --tls-port "$TLS_PORT" --a2a-listener "$A2A_PORT" |
    awk -v drop_pl="$drop_pl" -v main="${MOSQ_MAIN#"$ROOT"}" '
      /^listener / { seen_listener = 1 }
      /^use_username_as_clientid/ && !seen_listener { uuc = $0; next }
      /^persistence_location/ && drop_pl == 1 { print "# persistence_location: set in " main; next }
      { print }
      /^protocol / && uuc != "" { print uuc }'
}

acl() {
  local node_prefix=${PREFIX//\//_}
  "$(edgecoop_bin)" broker --print-config acl --prefix "$PREFIX"
  cat <<EOF

# Home Assistant MQTT discovery (opt-in per agent: home_assistant = true): an agent writes its device discovery
# config (node id ${node_prefix}_<agent-id>) and its JSON mirror (and may clear the per-entity configs of edgecoop
# versions before device discovery); the Home Assistant integration logs in as homeassistant.
pattern write $PREFIX/agents/%u/ha/#
pattern write homeassistant/device/${node_prefix}_%u/config
pattern write homeassistant/+/${node_prefix}_%u/+/config
user homeassistant
topic read homeassistant/#
topic write homeassistant/status
topic read $PREFIX/agents/+/ha/#
EOF
}

# -- TLS: a CA of this hub and the broker's certificate (docs/deployment.md shows the same openssl commands) ----
# tls_names: subjectAltName entries for the broker's certificate
tls_names() {
  local host names=() name
  host=$(hostname)
  names+=("DNS:$host" "DNS:${host%%.*}.local" "DNS:localhost" "IP:127.0.0.1" "IP:::1")
  for name in $(hostname -I 2>/dev/null || true) $(echo "${EDGECOOP_TLS_NAMES:-}" | tr , " "); do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then names+=("IP:$name"); else names+=("DNS:$name"); fi
  done
  local IFS=,
  echo "${names[*]}" | tr ',' '\n' | awk '!seen[$0]++' | paste -sd, -
}

make_certs() {
  local certs=$ROOT$MOSQ/certs ca=$ROOT$ETC/tls work
  if [ -f "$certs/edgecoop-server.crt" ] && [ -f "$certs/edgecoop-server.key" ]; then
    say "TLS: keeping $MOSQ/certs/edgecoop-server.crt ($(openssl x509 -noout -subject -enddate -in "$certs/edgecoop-server.crt" | paste -sd' ' -))"
    return
  fi
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
  mkdir -p "$certs" "$ca"
  own "root:root" 0700 "$ca"
  if [ ! -f "$ca/ca.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=edgecoop CA $(hostname)" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$ca/ca.key" -out "$ca/ca.crt" 2>/dev/null \
      || die "openssl could not make the CA"
    chmod 0600 "$ca/ca.key"
    say "TLS: created a CA for this hub ($ETC/tls/ca.crt; its key stays in $ETC/tls)"
  fi
  work=$(mktemp -d)
  # the extensions strict verifiers (Python >= 3.13's default X509_STRICT) insist on, and the names clients may use
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" \
    "subjectAltName=$(tls_names)" > "$work/server.ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$(hostname)" \
    -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null || die "openssl could not make the server key"
  openssl x509 -req -in "$work/server.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 825 -extfile "$work/server.ext" -out "$work/server.crt" 2>/dev/null || die "openssl could not sign the server certificate"
  install -m 0644 "$work/server.crt" "$certs/edgecoop-server.crt"
  install -m 0600 "$work/server.key" "$certs/edgecoop-server.key"
  own root:mosquitto 0640 "$certs/edgecoop-server.key"
  rm -rf "$work"
  CERTS_CHANGED=1
  say "TLS: created $MOSQ/certs/edgecoop-server.crt for $(tls_names)"
}

# install_ca_for_clients: /etc/edgecoop/ca.crt, what every client on this machine and the agent nodes check against
install_ca_for_clients() {
  if [ -f "$ROOT$ETC/tls/ca.crt" ] && ! cmp -s "$ROOT$ETC/tls/ca.crt" "$ROOT$ETC/ca.crt"; then
    install -m 0644 "$ROOT$ETC/tls/ca.crt" "$ROOT$ETC/ca.crt"
  fi
}

case "$PRINT" in
  broker) broker_config; exit 0 ;;
  acl) acl; exit 0 ;;
esac

if [ "$NO_SYSTEM" = 0 ]; then
  [ "$(id -u)" = 0 ] || die "run as root: sudo $0 (or --no-system --root DIR to stage the files without root)"
fi
if [ -n "$ROOT" ]; then say "installing into $ROOT (files keep their final paths; systemctl is not run)"; fi

# -- MQTT users --------------------------------------------------------------------------------------------------
new_password() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

ensure_user() {  # ensure_user NAME: a mosquitto_passwd entry and /etc/edgecoop/credentials/NAME.env, created once
  local user=$1 env=$ROOT$CREDS/$1.env passwd=$ROOT$MOSQ/edgecoop.passwd password
  [[ $user =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "MQTT user '$user' must be a plain agent id ([A-Za-z0-9._-], at most 64)"
  if [ -f "$env" ]; then
    password=$(sed -n 's/^EDGECOOP_PASSWORD=//p' "$env")
  else
    password=$(new_password)
    (umask 077 && printf 'EDGECOOP_USERNAME=%s\nEDGECOOP_PASSWORD=%s\n' "$user" "$password" > "$env.tmp")
    own "root:$GROUP" 0640 "$env.tmp" && mv "$env.tmp" "$env"
    say "created MQTT user $user (credentials in $CREDS/$user.env)"
  fi
  if ! grep -q "^${user}:" "$passwd" 2>/dev/null; then
    touch "$passwd"
    mosquitto_passwd -b "$passwd" "$user" "$password"
    PASSWD_CHANGED=1
  fi
}

agent_ids() {  # every /etc/edgecoop/<id>.toml except orchestrator.toml; the [agent] id must equal the file name
  local f id
  for f in "$ROOT$ETC"/*.toml; do
    [ -e "$f" ] || continue
    id=$(basename "$f" .toml)
    [ "$id" = orchestrator ] && continue
    local inner
    inner=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("agent", {}).get("id", ""))' "$f") \
      || die "$f is not valid TOML"
    [ "$inner" = "$id" ] || die "$f: [agent] id is '$inner'; it must equal the file name '$id' (the unit instance)"
    echo "$id"
  done
}

systemd_here() { [ "$NO_SYSTEM" = 0 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

if [ "$MODE" = add-user ]; then
  command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found: run this on the broker host"
  mkdir -p "$ROOT$CREDS" "$ROOT$MOSQ"
  PASSWD_CHANGED=0
  ensure_user "$ADD_USER"
  own root:mosquitto 0640 "$ROOT$MOSQ/edgecoop.passwd"
  if [ "$PASSWD_CHANGED" = 1 ] && systemd_here; then systemctl reload mosquitto; fi
  say "copy $CREDS/$ADD_USER.env to the agent node's $CREDS/$ADD_USER.env (mode 0640, root:edgecoop)"
  exit 0
fi

if [ "$MODE" = certs ]; then
  mkdir -p "$ROOT$ETC"
  CERTS_CHANGED=0
  make_certs
  install_ca_for_clients
  if [ "$CERTS_CHANGED" = 1 ]; then say "restart the broker to load the new certificate: systemctl restart mosquitto"; fi
  exit 0
fi

# -- 1. packages ---------------------------------------------------------------------------------------------------
pkgs=()
if [ "$NO_SYSTEM" = 0 ]; then
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
fi
if [ "$MODE" = full ]; then
  { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || [ "$NO_SYSTEM" = 1 ]; } || pkgs+=(mosquitto)
  command -v mosquitto_passwd >/dev/null || pkgs+=(mosquitto-clients mosquitto)
  command -v openssl >/dev/null || pkgs+=(openssl)
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  [ "${EDGECOOP_NO_APT:-0}" = 1 ] && die "missing packages: ${pkgs[*]} (EDGECOOP_NO_APT=1 is set)"
  [ "$NO_SYSTEM" = 1 ] && die "missing packages: ${pkgs[*]} (--no-system: install them first)"
  say "apt-get install ${pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); edgecoop needs >= 3.11 (Jetson/Ubuntu 22.04: PYTHON=/path/to/python3.11, see docs/deployment.md)"

agents_found=$(agent_ids)  # a bad agent file stops the install here, before anything is changed
mapfile -t AGENTS <<< "$agents_found"
[ -n "$agents_found" ] || AGENTS=()

# -- 2. user -------------------------------------------------------------------------------------------------------
if [ "$NO_SYSTEM" = 0 ]; then
  if ! id edgecoop >/dev/null 2>&1; then
    say "creating system user edgecoop"
    useradd --system --home-dir /var/lib/edgecoop --no-create-home --shell /usr/sbin/nologin --user-group edgecoop
  fi
  for group in video render gpio i2c spi dialout; do  # cameras, Jetson GPU, Pi sensors; only groups that exist
    if getent group "$group" >/dev/null && ! id -nG edgecoop | tr ' ' '\n' | grep -qx "$group"; then
      usermod -aG "$group" edgecoop
    fi
  done
fi

# -- 3. virtualenv ---------------------------------------------------------------------------------------------
# the hub runs the dashboard (its ASGI server is an extra); an agent node needs no extra unless its handlers do
if [ "$EXTRAS" = __default__ ]; then
  if [ "$MODE" = agent ]; then EXTRAS=""; else EXTRAS=dashboard; fi
fi
mkdir -p "$ROOT$HOME_DIR"
if [ "$NO_SYSTEM" = 0 ]; then
  [ -x "$ROOT$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$ROOT$VENV"; }
  say "installing edgecoop${EXTRAS:+[$EXTRAS]} from $SRC into $VENV"
  heartbeat "upgrading pip" "$ROOT$VENV/bin/python" -m pip install --upgrade pip || die "pip upgrade failed"
  heartbeat "installing edgecoop${EXTRAS:+[$EXTRAS]} (llama-cpp-python compiles for minutes, longer on a Pi)" \
    "$ROOT$VENV/bin/python" -m pip install --upgrade "$SRC${EXTRAS:+[$EXTRAS]}" || die "pip install failed (its last lines are above)"
else
  say "--no-system: no virtualenv; the units expect $VENV/bin/edgecoop"
fi
mkdir -p "$ROOT$HOME_DIR/docs" && cp "$SRC"/docs/*.md "$ROOT$HOME_DIR/docs/"

# -- 4. /etc/edgecoop ----------------------------------------------------------------------------------------------
mkdir -p "$ROOT$ETC" "$ROOT$CREDS"
own "root:$GROUP" 0750 "$ROOT$ETC" "$ROOT$CREDS"
# write_once FILE: stdin becomes FILE (0640 root:edgecoop) unless it exists: the operator's edits are kept
write_once() {
  local file=$ROOT$1
  if [ -f "$file" ]; then cat > /dev/null; return; fi
  cat > "$file.tmp"
  own "root:$GROUP" 0640 "$file.tmp" && mv "$file.tmp" "$file"
  say "created $1"
}
write_once "$ETC/edgecoop.env" <<EOF
# read by every edgecoop unit (credentials are per service, in $CREDS/<user>.env)
EDGECOOP_BROKER=$BROKER
# edgecoop-a2a-gateway.service: the broker's loopback listener without use_username_as_clientid (the gateway opens
# a connection per agent, each with its own client id; docs/interop.md), and the URL its A2A cards advertise
EDGECOOP_A2A_BROKER=mqtt://127.0.0.1:$A2A_PORT
#EDGECOOP_A2A_URL=mqtt://<this hub's name>:$MQTT_PORT
# for mqtts:// URLs: the CA of the broker's certificate (the hub's install.sh writes it; on an agent node, copy
# the hub's /etc/edgecoop/ca.crt here). Plain mqtt:// URLs ignore it.
EDGECOOP_CA_FILE=$ETC/ca.crt
# the dashboard has no login: keep it on loopback, or set 0.0.0.0 on a trusted network only
EDGECOOP_DASHBOARD_HOST=127.0.0.1
EDGECOOP_DASHBOARD_PORT=$DASHBOARD_PORT
# log records as JSON lines (one object per record) instead of text
#EDGECOOP_LOG_FORMAT=json
EOF
write_once "$ETC/orchestrator.toml" <<'EOF'
# edgecoop-orchestrator.service runs `edgecoop orchestrator --config /etc/edgecoop/orchestrator.toml`.
# Every key is also a flag of `edgecoop orchestrator` (see --help); the broker URL comes from EDGECOOP_BROKER in
# /etc/edgecoop/edgecoop.env and the credentials from /etc/edgecoop/credentials/orchestrator.env, unless a
# [broker] table here says otherwise (url, username, password_file, ca_file, ...).
[orchestrator]
id = "orchestrator"              # also its MQTT user: change both together
strategy = "capability-aware"    # or cascade, edge-only, least-loaded, round-robin, random, cloud-only
classifier = "rule"              # "slm": the SmolLM2 parser when the fast one is unsure (needs EDGECOOP_EXTRAS=llm)
db = "tasks.db"                  # task states and results; relative to the unit's WorkingDirectory /var/lib/edgecoop
summarize = false
EOF
write_once "$ETC/agent.toml.example" <<'EOF'
# Copy to /etc/edgecoop/<agent-id>.toml (the file name must equal [agent] id), then on the broker host run
# `sudo systemd/install.sh` again (it creates the agent's MQTT user) and `sudo systemctl enable --now edgecoop-agent@<agent-id>`.
[agent]
id = "pi-echo-01"
site = "home"
description = "Echo agent on a Raspberry Pi (replace with slm, vision, sensor ... capabilities)"
state_dir = "/var/lib/edgecoop/pi-echo-01"
home_assistant = false

# [broker] url defaults to EDGECOOP_BROKER from /etc/edgecoop/edgecoop.env; username and password come from
# /etc/edgecoop/credentials/<agent-id>.env

[[capabilities]]
kind = "echo"
EOF

# -- 5. broker -----------------------------------------------------------------------------------------------------
restart=0
PASSWD_CHANGED=0
if [ "$MODE" = full ]; then
  mkdir -p "$ROOT$MOSQ/conf.d"
  for user in "${SERVICE_USERS[@]}" "${AGENTS[@]}"; do ensure_user "$user"; done
  own root:mosquitto 0640 "$ROOT$MOSQ/edgecoop.passwd"
  CERTS_CHANGED=0
  make_certs
  install_ca_for_clients
  restart=$CERTS_CHANGED
  conf=$ROOT$MOSQ/conf.d/edgecoop.conf
  broker_config > "$conf.new"
  acl > "$ROOT$MOSQ/edgecoop.acl.new"
  cmp -s "$conf.new" "$conf" 2>/dev/null || restart=1
  cmp -s "$ROOT$MOSQ/edgecoop.acl.new" "$ROOT$MOSQ/edgecoop.acl" 2>/dev/null || PASSWD_CHANGED=1
  chmod 0644 "$conf.new" && mv "$conf.new" "$conf"
  own root:mosquitto 0640 "$ROOT$MOSQ/edgecoop.acl.new" && mv "$ROOT$MOSQ/edgecoop.acl.new" "$ROOT$MOSQ/edgecoop.acl"
fi

# -- 6. units --------------------------------------------------------------------------------------------------------
mkdir -p "$ROOT$UNITS"
install -m 0644 "$SRC"/systemd/edgecoop-agent@.service "$SRC"/systemd/edgecoop-orchestrator.service \
  "$SRC"/systemd/edgecoop-cms.service "$SRC"/systemd/edgecoop-dashboard.service "$SRC"/systemd/edgecoop.target \
  "$SRC"/systemd/edgecoop-a2a-gateway.service \
  "$ROOT$UNITS/"
if [ "$MODE" = full ]; then
  install -d "$ROOT$UNITS/mosquitto.service.d"
  install -m 0644 "$SRC/systemd/mosquitto-edgecoop.conf" "$ROOT$UNITS/mosquitto.service.d/edgecoop.conf"
fi
if systemd_here; then
  systemctl daemon-reload
  if [ "$MODE" = full ]; then
    systemctl enable mosquitto.service edgecoop.target
    if [ "$restart" = 1 ]; then systemctl restart mosquitto.service
    elif [ "$PASSWD_CHANGED" = 1 ]; then systemctl reload mosquitto.service
    fi
  fi
  for id in "${AGENTS[@]}"; do systemctl enable "edgecoop-agent@$id.service"; done
elif [ -n "$ROOT" ] || [ "$NO_SYSTEM" = 1 ]; then
  say "units installed, not enabled (--root / --no-system)"
else
  say "systemd is not running here: units installed but not enabled"
fi

say "done. Agents: ${AGENTS[*]:-(none yet: see $ETC/agent.toml.example)}"
if [ "$MODE" = full ]; then
  say "start:  systemctl start edgecoop.target      logs: journalctl -u 'edgecoop-*' -f"
  say "ask:    see docs/deployment.md §6 (edgecoop task as the MQTT user operator)"
else
  say "start:  systemctl start edgecoop-agent@<id>  (credentials from the broker host: install.sh --add-user <id>)"
fi
