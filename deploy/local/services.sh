#!/usr/bin/env bash
# Local Kafka (KRaft) + Cassandra for development and integration tests: one node of each
# (default), or a cluster of three of each (--nodes 3) beside it on other ports.
# No Docker: the JVMs run from jars that Maven copies into deploy/local/.cache/lib/.
#
#   services.sh [--nodes N] up      start what is not running, wait until all really serve
#   services.sh [--nodes N] down    stop all (data kept)
#   services.sh [--nodes N] status  show pid / readiness of each (exit 3 if one is not ready)
#   services.sh [--nodes N] clean-data   stop all and wipe their data folder
#   services.sh kafka-start|kafka-stop|cassandra-start|cassandra-stop
#                                  one service at a time (fault tests); restart keeps data
#   services.sh --nodes 3 kafka-stop|kafka-start|cassandra-stop|cassandra-start N
#                                  node N (1-3) of the cluster; kafka-kill / cassandra-kill N: SIGKILL
#
# --nodes 1 (default): Kafka 127.0.0.1:9092, Cassandra 127.0.0.1:9042, data in .data/.
# --nodes 3: Kafka 127.0.0.{1,2,3}:19092 (controllers :19093), Cassandra 127.0.0.{1,2,3}:19042
#   (storage :17000, JMX 127.0.0.1:1719N), data and logs per node in .data/cluster/<node>/.
#
# Environment:
#   STREAMTASKS_BROKER=kafka://host:port            use that Kafka: `up` starts none, only checks it
#   STREAMTASKS_BACKEND=cassandra://host:port/ks    same for Cassandra
#   JAVA_HOME (optional; else java on PATH), PYTHON (default python3)
#   KAFKA_HEAP (max 1g), KAFKA_HEAP_MIN (256m), CASSANDRA_HEAP (max 1g), CASSANDRA_HEAP_MIN (256m),
#   CASSANDRA_TIMERSLACK_NS (1000000; empty: the kernel's default), KAFKA_START_TIMEOUT (60), CASSANDRA_START_TIMEOUT (180)
#   NODES (1; same as --nodes)
set -euo pipefail

NODES="${NODES:-1}"
if [[ "${1:-}" == --nodes ]]; then NODES="${2:-}"; shift 2 || true
elif [[ "${1:-}" == --nodes=* ]]; then NODES="${1#--nodes=}"; shift; fi
[[ "$NODES" == 1 || "$NODES" == 3 ]] || {
  echo "services: error: --nodes must be 1 or 3, got '$NODES'" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="$HERE/.cache"
PYTHON="${PYTHON:-python3}"
if ((NODES == 1)); then
  DATA="$HERE/.data"
  KAFKA_PORTS=(9092 9093)              # broker, controller
  CASSANDRA_PORTS=(9042 7000 7199)     # CQL, storage (gossip), local JMX
else
  # the cluster runs beside the single node: other ports, its own data
  DATA="$HERE/.data/cluster"
  KAFKA_PORTS=(19092 19093)
  CASSANDRA_PORTS=(19042 17000)        # + JMX 1719N on 127.0.0.1 (see ports_of)
  # evenly spaced Murmur3 tokens, one per node: the three can start at once, none bootstraps
  CASSANDRA_TOKENS=(-9223372036854775808 -3074457345618258603 3074457345618258602)
fi
LOGS="$DATA/logs"
KAFKA_HEAP="${KAFKA_HEAP:-1g}"
# a broker holding many partitions (a long-lived dev keyspace: ~15,000) ran out of a 512m heap
KAFKA_HEAP_MIN="${KAFKA_HEAP_MIN:-256m}"
CASSANDRA_HEAP="${CASSANDRA_HEAP:-1g}"
# Cassandra's request pools park their idle threads for 10 us - 1 ms at a time while they
# look for work: a steady trickle of requests kept them spinning and cost half a core of
# this 2-core machine at 130 tasks/s. A 1 ms timer slack lets the kernel batch those timed
# wake-ups; a request still wakes a parked thread at once (docs/decisions.md).
CASSANDRA_TIMERSLACK_NS="${CASSANDRA_TIMERSLACK_NS-1000000}"
# Cassandra mlockall()s its memory at startup, so an initial heap of 1g would be resident at once
CASSANDRA_HEAP_MIN="${CASSANDRA_HEAP_MIN:-256m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
CASSANDRA_START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-180}"
KAFKA_STOP_TIMEOUT=30
CASSANDRA_STOP_TIMEOUT=60

say() { echo "services: $*"; }
die() { echo "services: error: $*" >&2; exit 1; }

# A service is `kafka` / `cassandra` (one node) or `kafkaN` / `cassandraN` (node N of the cluster).
kind_of() { echo "${1%%[0-9]*}"; }
node_of() { local n="${1##*[a-z]}"; echo "${n:-1}"; }
host_of() { echo "127.0.0.$(node_of "$1")"; }
addr_of() {  # service -> host:port its clients use
  local port="${KAFKA_PORTS[0]}"
  [[ "$(kind_of "$1")" == kafka ]] || port="${CASSANDRA_PORTS[0]}"
  echo "$(host_of "$1"):$port"
}
services_of() {  # kind -> its services (one per node)
  if ((NODES == 1)); then echo "$1"; else local n; for ((n = 1; n <= NODES; n++)); do echo "$1$n"; done; fi
}
endpoint_of() {  # kind -> the URL clients use (every node)
  local svc hosts=()
  for svc in $(services_of "$1"); do hosts+=("$(addr_of "$svc")"); done
  local IFS=,
  echo "$1://${hosts[*]}"
}
home_of() { echo "$DATA/$1"; }   # service -> its data and generated config (and logs in a cluster)
logdir_of() { if ((NODES == 1)); then echo "$LOGS"; else echo "$DATA/$1/logs"; fi; }
log_of() { echo "$(logdir_of "$1")/$1.log"; }
pidfile_of() { echo "$DATA/$1.pid"; }
marker_of() { echo "-Dstreamtasks.service=$1@$HERE"; }   # tags our JVMs' command lines

fail_with_log() {  # service message
  local log; log="$(log_of "$1")"
  {
    echo "services: error: $2"
    echo "services: see $log; last 40 lines:"
    echo "----------------------------------------------------------------------"
    tail -n 40 "$log" 2>/dev/null || true
    echo "----------------------------------------------------------------------"
  } >&2
  exit 1
}

# ---------------------------------------------------------------- processes

pid_alive() {  # pid -> true if it exists and is not a zombie
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [[ "$state" != "Z" ]]
}

# prints the pid of our running JVM for a service, or fails
running_pid() {
  local pid pf; pf="$(pidfile_of "$1")"
  [[ -f "$pf" ]] || return 1
  pid="$(cat "$pf")"
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
  # guard against pid reuse: the process must carry our marker
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$(marker_of "$1")" || return 1
  echo "$pid"
}

stop_service() {  # service timeout
  local svc="$1" timeout="$2" pid i
  if ! pid="$(running_pid "$svc")"; then
    rm -f "$(pidfile_of "$svc")"
    say "$svc is not running"
    return 0
  fi
  say "stopping $svc (pid $pid) ..."
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 4; i++)); do
    pid_alive "$pid" || break
    sleep 0.25
  done
  if pid_alive "$pid"; then
    say "$svc did not stop within ${timeout}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do pid_alive "$pid" || break; sleep 0.25; done
  fi
  wait_ports_closed "$svc"
  rm -f "$(pidfile_of "$svc")"
  say "$svc stopped"
}

# A JVM's main thread shows as a zombie while its other threads still exit and hold
# its sockets: wait for its ports too, or an immediate start finds them in use.
wait_ports_closed() {  # service
  local svc="$1" port host i
  for port in $(ports_of "$svc"); do
    host="$(listen_host_of "$svc" "$port")"
    for ((i = 0; i < 120; i++)); do
      [[ -n "$(port_listener "$host" "$port")" ]] || break
      ((i > 0)) || say "waiting for port $host:$port of $svc to close"
      sleep 0.25
    done
  done
}

# ---------------------------------------------------------------- pre-flight checks

find_java() {
  [[ -z "${JAVA_MAJOR:-}" ]] || return 0
  if [[ -n "${JAVA_HOME:-}" ]]; then
    [[ -x "$JAVA_HOME/bin/java" ]] ||
      die "JAVA_HOME is set to '$JAVA_HOME' but $JAVA_HOME/bin/java does not exist; point it at a JDK 17+ or unset it"
    JAVA="$JAVA_HOME/bin/java"
  else
    JAVA="$(command -v java || true)"
    [[ -n "$JAVA" ]] || die "no java found: install a JDK 17 (e.g. apt-get install openjdk-17-jdk-headless) or set JAVA_HOME"
  fi
  local v
  v="$("$JAVA" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')"
  [[ "$v" =~ ^[0-9]+$ ]] || die "could not run '$JAVA -version'"
  ((v >= 17)) || die "$JAVA is Java $v; Kafka 4 needs Java 17+ (set JAVA_HOME to a JDK 17)"
  JAVA_MAJOR="$v"
}

# copy the jars of deploy/local/<svc>/pom.xml into .cache/lib/<svc> (again whenever the pom changes)
ensure_libs() {
  local svc="$1" pom="$HERE/$1/pom.xml" dir="$CACHE/lib/$1" want
  want="$(sha256sum "$pom" | cut -d' ' -f1)"
  [[ -f "$dir/.pom.sha256" && "$(cat "$dir/.pom.sha256")" == "$want" ]] && return 0
  command -v mvn >/dev/null ||
    die "mvn (Maven) not found: it is needed once to fetch the $svc jars into $dir (apt-get install maven)"
  say "fetching $svc jars with Maven into $dir ..."
  rm -rf "$dir"
  local out
  out="$(mvn -q -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies -DoutputDirectory="$dir" 2>&1)" || {
    echo "$out" >&2
    die "Maven could not fetch the $svc jars (see output above); is Maven Central reachable?"
  }
  echo "$want" >"$dir/.pom.sha256"
}

port_listener() {  # host port -> prints what listens on host:port (or on every address), or nothing
  if command -v ss >/dev/null; then
    ss -Hltnp "( src $1:$2 or src 0.0.0.0:$2 or src [::]:$2 )" 2>/dev/null || true
  elif (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then
    echo "in use"
  fi
}

ports_of() {  # service -> its ports
  if [[ "$(kind_of "$1")" == kafka ]]; then echo "${KAFKA_PORTS[@]}"
  else echo "${CASSANDRA_PORTS[@]}" $(jmx_port_of "$1"); fi
}

jmx_port_of() {  # local JMX listens on 127.0.0.1 whatever the node's address: one port per node
  if ((NODES == 1)); then echo "${CASSANDRA_PORTS[2]}"; else echo $((17190 + $(node_of "$1"))); fi
}

listen_host_of() {  # service port -> the address it listens on
  if [[ "$(kind_of "$1")" == cassandra && "$2" == "$(jmx_port_of "$1")" ]]; then echo 127.0.0.1
  else host_of "$1"; fi
}

check_ports_free() {  # service
  local svc="$1" port line who host
  for port in $(ports_of "$svc"); do
    host="$(listen_host_of "$svc" "$port")"
    line="$(port_listener "$host" "$port")"
    if [[ -n "$line" ]]; then
      who="$(grep -o 'users:(("[^"]*",pid=[0-9]*' <<<"$line" | head -1 | sed 's/users:(("\([^"]*\)",pid=\([0-9]*\)/\1 (pid \2)/' || true)"
      local envvar=STREAMTASKS_BACKEND
      [[ "$(kind_of "$svc")" != kafka ]] || envvar=STREAMTASKS_BROKER
      die "port $host:$port needed by $svc is already in use by ${who:-another process}; stop it, or set $envvar to use an existing $svc instead"
    fi
  done
}

check_python() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (needed for the readiness checks)"
}

rotate_log() {
  local log; log="$(log_of "$1")"
  mkdir -p "$(dirname "$log")"
  if [[ -f "$log" ]] && (($(stat -c %s "$log") > 50 * 1024 * 1024)); then mv -f "$log" "$log.1"; fi
  echo "===== $(date -Is) services.sh: starting $1" >>"$log"
}

launch() {  # service args... : start a JVM detached, write the pid file
  local svc="$1" log pid
  shift
  log="$(log_of "$svc")"
  # Kafka keeps a file open per log segment and index of every partition: a test run's
  # thousands of partitions outgrow a default limit ("Too many open files" ends the
  # broker). Raise the soft limit to the hard one, or beyond it where allowed (root).
  ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  (
    # LAUNCH_TIMERSLACK_NS: the JVM's timer slack (inherited by its threads; see
    # CASSANDRA_TIMERSLACK_NS). A kernel without /proc/self/timerslack_ns keeps its own.
    if [[ -n "${LAUNCH_TIMERSLACK_NS:-}" ]]; then
      echo "$LAUNCH_TIMERSLACK_NS" 2>/dev/null >/proc/self/timerslack_ns || true
    fi
    exec setsid nohup "$JAVA" "$(marker_of "$svc")" "$@" >>"$log" 2>&1 </dev/null
  ) &
  pid=$!
  echo "$pid" >"$(pidfile_of "$svc")"
  say "$svc started (pid $pid), log: $log"
}

# ---------------------------------------------------------------- kafka

kafka_preflight() {  # service
  running_pid "$1" >/dev/null && return 0
  find_java
  ensure_libs kafka
  check_ports_free "$1"
}

# The cluster's id and its controller quorum (`id@host:port:directory-id,...`), drawn once
# and kept in .data/cluster/kafka-quorum: every node is formatted with the same ones.
kafka_quorum() {  # log_opts... -> prints "cluster_id voters"
  local file="$DATA/kafka-quorum" cp="$CACHE/lib/kafka/*" n voters=() id
  if [[ ! -f "$file" ]]; then
    for ((n = 0; n <= NODES; n++)); do
      id="$("$JAVA" "$@" -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null |
        grep -E '^[A-Za-z0-9_-]{22}$' | tail -n1)" || true
      [[ -n "$id" ]] || return 1
      ((n == 0)) && echo "$id" >"$file.tmp" || voters+=("$n@127.0.0.$n:${KAFKA_PORTS[1]}:$id")
    done
    local IFS=,
    echo "${voters[*]}" >>"$file.tmp"
    mv "$file.tmp" "$file"
  fi
  printf '%s %s\n' "$(sed -n 1p "$file")" "$(sed -n 2p "$file")"
}

kafka_launch() {  # service
  local svc="$1" pid cp="$CACHE/lib/kafka/*" home props log cluster_id voters format_opts
  if pid="$(running_pid "$svc")"; then say "$svc already running (pid $pid)"; return 0; fi
  home="$(home_of "$svc")" props="$(home_of "$svc")/server.properties" log="$(log_of "$svc")"
  mkdir -p "$home/data"
  rotate_log "$svc"
  local log_opts=(-Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" -Dkafka.logs.dir="$(logdir_of "$svc")")
  sed "s|@DATA_DIR@|$home|g" "$HERE/kafka/server.properties" >"$props"
  if ((NODES == 1)); then
    format_opts=(--standalone)
  else
    read -r cluster_id voters < <(kafka_quorum "${log_opts[@]}") ||
      fail_with_log "$svc" "could not generate the Kafka cluster id"
    # later keys win in a properties file: the cluster's settings override the single node's
    sed -e "s|@NODE_ID@|$(node_of "$svc")|g" -e "s|@HOST@|$(host_of "$svc")|g" \
      -e "s|@BOOTSTRAP@|$(sed -E 's/(^|,)[0-9]+@/\1/g; s/:[^:,]+(,|$)/\1/g' <<<"$voters")|g" \
      "$HERE/kafka/cluster.properties" >>"$props"
    format_opts=(--initial-controllers "$voters")
  fi
  if [[ ! -f "$home/data/meta.properties" ]]; then
    if [[ -z "${cluster_id:-}" ]]; then
      # (log4j also writes to stdout: keep only the id line)
      cluster_id="$("$JAVA" "${log_opts[@]}" -cp "$cp" kafka.tools.StorageTool random-uuid 2>>"$log" |
        grep -E '^[A-Za-z0-9_-]{22}$' | tail -n1)" || true
      [[ -n "$cluster_id" ]] || fail_with_log "$svc" "could not generate a Kafka cluster id"
    fi
    say "formatting $svc storage (cluster id $cluster_id)"
    "$JAVA" "${log_opts[@]}" -cp "$cp" kafka.tools.StorageTool format "${format_opts[@]}" \
      -t "$cluster_id" -c "$props" >>"$log" 2>&1 || fail_with_log "$svc" "formatting Kafka storage failed"
  fi
  # JVM options as in Kafka's kafka-run-class.sh / kafka-server-start.sh, smaller heap
  launch "$svc" -Xms"$KAFKA_HEAP_MIN" -Xmx"$KAFKA_HEAP" -server \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true \
    -Xlog:gc*:file="$(logdir_of "$svc")/$svc-gc.log":time,tags:filecount=3,filesize=10M \
    "${log_opts[@]}" -cp "$cp" kafka.Kafka "$props"
}

wait_service() {  # service timeout_s stop_timeout_s
  local svc=$1 timeout=$2 stop_timeout=$3 pid rc=0 kind; kind="$(kind_of "$1")"
  pid="$(running_pid "$svc")" || fail_with_log "$svc" "$svc is not running (it exited during startup)"
  "$PYTHON" "$HERE/wait_ready.py" "$kind" "$(addr_of "$svc")" --timeout "$timeout" --pid "$pid" || rc=$?
  case $rc in
    0) ;;
    2) fail_with_log "$svc" "$svc exited during startup" ;;
    *) stop_service "$svc" "$stop_timeout" >&2
       fail_with_log "$svc" "$svc did not become ready within ${timeout}s (stopped it)" ;;
  esac
}

kafka_wait() { wait_service "$1" "$KAFKA_START_TIMEOUT" 10; }

# ---------------------------------------------------------------- cassandra

cassandra_preflight() {  # service
  running_pid "$1" >/dev/null && return 0
  find_java
  ((JAVA_MAJOR == 17 || JAVA_MAJOR == 11)) ||
    say "warning: Cassandra 5.0 supports Java 11 and 17; $JAVA is Java $JAVA_MAJOR"
  ensure_libs cassandra
  check_ports_free "$1"
}

cassandra_config() {  # service -> path of its cassandra.yaml (the template, or a node's copy)
  local svc="$1" host seeds=() n conf
  if ((NODES == 1)); then echo "$HERE/cassandra/cassandra.yaml"; return 0; fi
  host="$(host_of "$svc")" n="$(node_of "$svc")" conf="$(home_of "$svc")/cassandra.yaml"
  for ((i = 1; i <= NODES; i++)); do seeds+=("127.0.0.$i:${CASSANDRA_PORTS[1]}"); done
  local IFS=,
  # every node is a seed (one down still lets the others restart); one token each
  sed -E -e "s|^listen_address: .*|listen_address: $host|" -e "s|^rpc_address: .*|rpc_address: $host|" \
    -e "s|^storage_port: .*|storage_port: ${CASSANDRA_PORTS[1]}|" \
    -e "s|^native_transport_port: .*|native_transport_port: ${CASSANDRA_PORTS[0]}|" \
    -e "s|- seeds: .*|- seeds: \"${seeds[*]}\"|" \
    -e "s|^cluster_name: .*|cluster_name: streamtasks-local-cluster|" \
    -e "s|^num_tokens: .*|num_tokens: 1\ninitial_token: ${CASSANDRA_TOKENS[n - 1]}\nauto_bootstrap: false|" \
    -e "/^allocate_tokens_for_local_replication_factor:/d" \
    "$HERE/cassandra/cassandra.yaml" >"$conf"
  echo "$conf"
}

cassandra_launch() {  # service
  local svc="$1" pid lib="$CACHE/lib/cassandra" jamm home conf
  if pid="$(running_pid "$svc")"; then say "$svc already running (pid $pid)"; return 0; fi
  home="$(home_of "$svc")"
  mkdir -p "$home"
  rotate_log "$svc"
  conf="$(cassandra_config "$svc")"
  jamm="$(ls "$lib"/jamm-*.jar | head -1)"
  # options from Cassandra's conf/jvm-server.options, jvm17-server.options and cassandra-env.sh
  local jpms=(
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
  )
  LAUNCH_TIMERSLACK_NS="$CASSANDRA_TIMERSLACK_NS" \
    launch "$svc" -Xms"$CASSANDRA_HEAP_MIN" -Xmx"$CASSANDRA_HEAP" -Xss256k -ea -da:net.openhft... \
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m \
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 \
    -Xlog:gc:file="$(logdir_of "$svc")/$svc-gc.log":time,tags:filecount=3,filesize=10M \
    -XX:+UseThreadPriorities -XX:+UseTLAB -XX:+ResizeTLAB -XX:+PerfDisableSharedMem \
    -XX:+CrashOnOutOfMemoryError -Djava.net.preferIPv4Stack=true \
    -Dio.netty.tryReflectionSetAccessible=true -Dio.netty.allocator.useCacheForAllThreads=true \
    -Dio.netty.allocator.maxOrder=11 \
    "${jpms[@]}" \
    -javaagent:"$jamm" \
    -Dcassandra.config="file://$conf" \
    -Dcassandra.storagedir="$home" \
    -Dcassandra.logdir="$(logdir_of "$svc")" \
    -Dlogback.configurationFile="$HERE/cassandra/logback.xml" \
    -Dcassandra-foreground=yes \
    -Dcassandra.jmx.local.port="$(jmx_port_of "$svc")" \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.ring_delay_ms=0 \
    -XX:HeapDumpPath="$home" \
    -cp "$lib/*" org.apache.cassandra.service.CassandraDaemon
}

cassandra_wait() { wait_service "$1" "$CASSANDRA_START_TIMEOUT" 20; }

# ---------------------------------------------------------------- external services

external_addr() {  # url -> host:port (first host for kafka lists)
  local rest="${1#*://}"
  echo "${rest%%/*}"
}

check_external() {  # service url timeout
  local addr; addr="$(external_addr "$2")"
  say "$1: using external $2 (not starting a local one)"
  "$PYTHON" "$HERE/wait_ready.py" "$1" "$addr" --timeout "$3" ||
    die "external $1 at $2 does not answer"
}

# ---------------------------------------------------------------- commands

cmd_up() {
  local ext_k="${STREAMTASKS_BROKER:-}" ext_c="${STREAMTASKS_BACKEND:-}" svc
  check_python
  # all checks first, so a bad environment fails before anything is started
  if [[ -z "$ext_k" ]]; then for svc in $(services_of kafka); do kafka_preflight "$svc"; done; fi
  if [[ -z "$ext_c" ]]; then for svc in $(services_of cassandra); do cassandra_preflight "$svc"; done; fi
  # the nodes of a cluster start at once and wait for each other (a KRaft quorum needs two)
  if [[ -z "$ext_k" ]]; then for svc in $(services_of kafka); do kafka_launch "$svc"; done; fi
  if [[ -z "$ext_c" ]]; then for svc in $(services_of cassandra); do cassandra_launch "$svc"; done; fi
  if [[ -n "$ext_k" ]]; then check_external kafka "$ext_k" 30
  else for svc in $(services_of kafka); do kafka_wait "$svc"; done; fi
  if [[ -n "$ext_c" ]]; then check_external cassandra "$ext_c" 30
  else for svc in $(services_of cassandra); do cassandra_wait "$svc"; done; fi
  ((NODES == 1)) || wait_cluster
  if [[ -n "$ext_k" ]]; then echo "kafka://$(external_addr "$ext_k")"; else endpoint_of kafka; fi
  if [[ -n "$ext_c" ]]; then echo "cassandra://$(external_addr "$ext_c")"; else endpoint_of cassandra; fi
}

wait_cluster() {  # every node of each service sees the others
  local kind
  for kind in kafka cassandra; do
    "$PYTHON" "$HERE/wait_ready.py" "$kind" "$(endpoint_of "$kind" | sed 's|^[a-z]*://||')" \
      --nodes "$NODES" --timeout "$CASSANDRA_START_TIMEOUT" ||
      die "the $kind nodes did not all see each other within ${CASSANDRA_START_TIMEOUT}s (services.sh --nodes $NODES status)"
  done
}

status_one() {  # service
  local pid svc="$1" addr; addr="$(addr_of "$1")"
  if pid="$(running_pid "$svc")"; then
    if "$PYTHON" "$HERE/wait_ready.py" "$(kind_of "$svc")" "$addr" --timeout 5 --pid "$pid" >/dev/null 2>&1; then
      echo "$svc: running (pid $pid), ready at $addr, rss $(($(ps -o rss= -p "$pid") / 1024)) MiB"
    else
      echo "$svc: running (pid $pid), NOT answering at $addr (starting?), log: $(log_of "$svc")"; return 3
    fi
  else
    echo "$svc: stopped (log: $(log_of "$svc"))"; return 3
  fi
}

cmd_status() {
  local rc=0 svc
  check_python
  if [[ -n "${STREAMTASKS_BROKER:-}" ]]; then
    "$PYTHON" "$HERE/wait_ready.py" kafka "$(external_addr "$STREAMTASKS_BROKER")" --timeout 5 >/dev/null 2>&1 &&
      echo "kafka: external $STREAMTASKS_BROKER, ready" || { echo "kafka: external $STREAMTASKS_BROKER, NOT answering"; rc=3; }
  else for svc in $(services_of kafka); do status_one "$svc" || rc=3; done; fi
  if [[ -n "${STREAMTASKS_BACKEND:-}" ]]; then
    "$PYTHON" "$HERE/wait_ready.py" cassandra "$(external_addr "$STREAMTASKS_BACKEND")" --timeout 5 >/dev/null 2>&1 &&
      echo "cassandra: external $STREAMTASKS_BACKEND, ready" || { echo "cassandra: external $STREAMTASKS_BACKEND, NOT answering"; rc=3; }
  else for svc in $(services_of cassandra); do status_one "$svc" || rc=3; done; fi
  return $rc
}

cmd_down() {
  local svc
  # brokers stop together: the last of a KRaft quorum to stop alone could not elect a controller
  for svc in $(services_of kafka); do stop_service "$svc" "$KAFKA_STOP_TIMEOUT" & done
  wait
  for svc in $(services_of cassandra); do stop_service "$svc" "$CASSANDRA_STOP_TIMEOUT"; done
}

kill_service() {  # service: SIGKILL, as a crash would (fault tests)
  local pid i
  pid="$(running_pid "$1")" || { say "$1 is not running"; return 0; }
  kill -KILL "$pid"
  for ((i = 0; i < 120; i++)); do pid_alive "$pid" || break; sleep 0.25; done
  wait_ports_closed "$1"
  rm -f "$(pidfile_of "$1")"
  say "$1 (pid $pid) killed"
}

usage() {
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

node_service() {  # kind [N] -> the service: `kind` with one node, `kindN` in a cluster
  if ((NODES == 1)); then
    [[ -z "${2:-}" || "${2:-}" == 1 ]] || { echo "services: error: node '$2' given but --nodes is 1" >&2; exit 2; }
    echo "$1"
  else
    [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] && (($2 <= NODES)) ||
      { echo "services: error: $1 commands need a node number 1-$NODES, got '${2:-}'" >&2; exit 2; }
    echo "$1$2"
  fi
}

cmd="${1:-}"
case "$cmd" in
  kafka-*|cassandra-*) svc="$(node_service "${cmd%%-*}" "${2:-}")" || exit 2 ;;
esac
case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  clean-data)
    cmd_down
    # the single node's folder holds the cluster's: leave that to `--nodes 3 clean-data`
    if ((NODES == 1)); then find "$DATA" -mindepth 1 -maxdepth 1 ! -name cluster -exec rm -rf {} +
    else rm -rf "$DATA"; fi
    say "wiped $DATA"
    ;;
  kafka-start) check_python; kafka_preflight "$svc"; kafka_launch "$svc"; kafka_wait "$svc"; echo "kafka://$(addr_of "$svc")" ;;
  kafka-stop) stop_service "$svc" "$KAFKA_STOP_TIMEOUT" ;;
  kafka-kill|cassandra-kill) kill_service "$svc" ;;
  cassandra-start) check_python; cassandra_preflight "$svc"; cassandra_launch "$svc"; cassandra_wait "$svc"; echo "cassandra://$(addr_of "$svc")" ;;
  cassandra-stop) stop_service "$svc" "$CASSANDRA_STOP_TIMEOUT" ;;
  *) usage ;;
esac
