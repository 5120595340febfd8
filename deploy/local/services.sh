#!/usr/bin/env bash
# Local Kafka (KRaft, single node) + Cassandra (single node) for development and integration tests.
# No Docker: the JVMs run from jars that Maven copies into deploy/local/.cache/lib/.
#
#   services.sh up                 start what is not running, wait until both really serve
#   services.sh down               stop both (data kept)
#   services.sh status             show pid / readiness of both (exit 3 if one is not ready)
#   services.sh clean-data         stop both and wipe deploy/local/.data
#   services.sh kafka-start|kafka-stop|cassandra-start|cassandra-stop
#                                  one service at a time (fault tests); restart keeps data
#
# Environment:
#   STREAMTASKS_BROKER=kafka://host:port            use that Kafka: `up` starts none, only checks it
#   STREAMTASKS_BACKEND=cassandra://host:port/ks    same for Cassandra
#   JAVA_HOME (optional; else java on PATH), PYTHON (default python3)
#   KAFKA_HEAP (512m), CASSANDRA_HEAP (max 1g), CASSANDRA_HEAP_MIN (256m), KAFKA_START_TIMEOUT (60), CASSANDRA_START_TIMEOUT (180)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="$HERE/.cache"
DATA="$HERE/.data"
LOGS="$DATA/logs"
PYTHON="${PYTHON:-python3}"

KAFKA_ADDR=127.0.0.1:9092
CASSANDRA_ADDR=127.0.0.1:9042
KAFKA_PORTS=(9092 9093)              # broker, controller
CASSANDRA_PORTS=(9042 7000 7199)     # CQL, storage (gossip), local JMX
KAFKA_HEAP="${KAFKA_HEAP:-512m}"
CASSANDRA_HEAP="${CASSANDRA_HEAP:-1g}"
# Cassandra mlockall()s its memory at startup, so an initial heap of 1g would be resident at once
CASSANDRA_HEAP_MIN="${CASSANDRA_HEAP_MIN:-256m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
CASSANDRA_START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-180}"
KAFKA_STOP_TIMEOUT=30
CASSANDRA_STOP_TIMEOUT=60

say() { echo "services: $*"; }
die() { echo "services: error: $*" >&2; exit 1; }

log_of() { echo "$LOGS/$1.log"; }
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
  # A JVM's main thread shows as a zombie while its other threads still exit and hold
  # its sockets: wait for its ports too, or an immediate start finds them in use.
  local port
  for port in $(ports_of "$svc"); do
    for ((i = 0; i < 120; i++)); do
      [[ -n "$(port_listener "$port")" ]] || break
      ((i > 0)) || say "waiting for port $port of $svc to close"
      sleep 0.25
    done
  done
  rm -f "$(pidfile_of "$svc")"
  say "$svc stopped"
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

port_listener() {  # port -> prints what listens on 127.0.0.1:port, or nothing
  if command -v ss >/dev/null; then
    ss -Hltnp "sport = :$1" 2>/dev/null || true
  elif (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "in use"
  fi
}

ports_of() {  # service -> its ports
  if [[ "$1" == kafka ]]; then echo "${KAFKA_PORTS[@]}"; else echo "${CASSANDRA_PORTS[@]}"; fi
}

check_ports_free() {  # service port...
  local svc="$1" port line who
  shift
  for port in "$@"; do
    line="$(port_listener "$port")"
    if [[ -n "$line" ]]; then
      who="$(grep -o 'users:(("[^"]*",pid=[0-9]*' <<<"$line" | head -1 | sed 's/users:(("\([^"]*\)",pid=\([0-9]*\)/\1 (pid \2)/' || true)"
      local envvar=STREAMTASKS_BACKEND
      [[ "$svc" != kafka ]] || envvar=STREAMTASKS_BROKER
      die "port $port needed by $svc is already in use by ${who:-another process}; stop it, or set $envvar to use an existing $svc instead"
    fi
  done
}

check_python() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (needed for the readiness checks)"
}

rotate_log() {
  local log; log="$(log_of "$1")"
  mkdir -p "$LOGS"
  if [[ -f "$log" ]] && (($(stat -c %s "$log") > 50 * 1024 * 1024)); then mv -f "$log" "$log.1"; fi
  echo "===== $(date -Is) services.sh: starting $1" >>"$log"
}

launch() {  # service args... : start a JVM detached, write the pid file
  local svc="$1" log pid
  shift
  log="$(log_of "$svc")"
  setsid nohup "$JAVA" "$(marker_of "$svc")" "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$(pidfile_of "$svc")"
  say "$svc started (pid $pid), log: $log"
}

# ---------------------------------------------------------------- kafka

kafka_preflight() {
  running_pid kafka >/dev/null && return 0
  find_java
  ensure_libs kafka
  check_ports_free kafka "${KAFKA_PORTS[@]}"
}

kafka_launch() {
  local pid cp="$CACHE/lib/kafka/*" props="$DATA/kafka/server.properties" log cluster_id
  if pid="$(running_pid kafka)"; then say "kafka already running (pid $pid)"; return 0; fi
  log="$(log_of kafka)"
  mkdir -p "$DATA/kafka/data"
  sed "s|@DATA_DIR@|$DATA/kafka|g" "$HERE/kafka/server.properties" >"$props"
  rotate_log kafka
  local log_opts=(-Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" -Dkafka.logs.dir="$LOGS")
  if [[ ! -f "$DATA/kafka/data/meta.properties" ]]; then
    # (log4j also writes to stdout: keep only the id line)
    cluster_id="$("$JAVA" "${log_opts[@]}" -cp "$cp" kafka.tools.StorageTool random-uuid 2>>"$log" |
      grep -E '^[A-Za-z0-9_-]{22}$' | tail -n1)" || true
    [[ -n "$cluster_id" ]] || fail_with_log kafka "could not generate a Kafka cluster id"
    say "formatting kafka storage (cluster id $cluster_id)"
    "$JAVA" "${log_opts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone \
      -t "$cluster_id" -c "$props" >>"$log" 2>&1 || fail_with_log kafka "formatting Kafka storage failed"
  fi
  # JVM options as in Kafka's kafka-run-class.sh / kafka-server-start.sh, smaller heap
  launch kafka -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -server \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true \
    -Xlog:gc*:file="$LOGS/kafka-gc.log":time,tags:filecount=3,filesize=10M \
    "${log_opts[@]}" -cp "$cp" kafka.Kafka "$props"
}

wait_service() {  # service address timeout_s stop_timeout_s
  local svc=$1 addr=$2 timeout=$3 stop_timeout=$4 pid rc=0
  pid="$(running_pid "$svc")" || fail_with_log "$svc" "$svc is not running (it exited during startup)"
  "$PYTHON" "$HERE/wait_ready.py" "$svc" "$addr" --timeout "$timeout" --pid "$pid" || rc=$?
  case $rc in
    0) ;;
    2) fail_with_log "$svc" "$svc exited during startup" ;;
    *) stop_service "$svc" "$stop_timeout" >&2
       fail_with_log "$svc" "$svc did not become ready within ${timeout}s (stopped it)" ;;
  esac
}

kafka_wait() { wait_service kafka "$KAFKA_ADDR" "$KAFKA_START_TIMEOUT" 10; }

# ---------------------------------------------------------------- cassandra

cassandra_preflight() {
  running_pid cassandra >/dev/null && return 0
  find_java
  ((JAVA_MAJOR == 17 || JAVA_MAJOR == 11)) ||
    say "warning: Cassandra 5.0 supports Java 11 and 17; $JAVA is Java $JAVA_MAJOR"
  ensure_libs cassandra
  check_ports_free cassandra "${CASSANDRA_PORTS[@]}"
}

cassandra_launch() {
  local pid lib="$CACHE/lib/cassandra" jamm
  if pid="$(running_pid cassandra)"; then say "cassandra already running (pid $pid)"; return 0; fi
  mkdir -p "$DATA/cassandra"
  rotate_log cassandra
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
  launch cassandra -Xms"$CASSANDRA_HEAP_MIN" -Xmx"$CASSANDRA_HEAP" -Xss256k -ea -da:net.openhft... \
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m \
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 \
    -XX:+UseThreadPriorities -XX:+UseTLAB -XX:+ResizeTLAB -XX:+PerfDisableSharedMem \
    -XX:+CrashOnOutOfMemoryError -Djava.net.preferIPv4Stack=true \
    -Dio.netty.tryReflectionSetAccessible=true -Dio.netty.allocator.useCacheForAllThreads=true \
    -Dio.netty.allocator.maxOrder=11 \
    "${jpms[@]}" \
    -javaagent:"$jamm" \
    -Dcassandra.config="file://$HERE/cassandra/cassandra.yaml" \
    -Dcassandra.storagedir="$DATA/cassandra" \
    -Dcassandra.logdir="$LOGS" \
    -Dlogback.configurationFile="$HERE/cassandra/logback.xml" \
    -Dcassandra-foreground=yes \
    -Dcassandra.jmx.local.port=7199 \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.ring_delay_ms=0 \
    -XX:HeapDumpPath="$DATA" \
    -cp "$lib/*" org.apache.cassandra.service.CassandraDaemon
}

cassandra_wait() { wait_service cassandra "$CASSANDRA_ADDR" "$CASSANDRA_START_TIMEOUT" 20; }

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
  local ext_k="${STREAMTASKS_BROKER:-}" ext_c="${STREAMTASKS_BACKEND:-}"
  check_python
  # all checks first, so a bad environment fails before anything is started
  [[ -n "$ext_k" ]] || kafka_preflight
  [[ -n "$ext_c" ]] || cassandra_preflight
  [[ -n "$ext_k" ]] || kafka_launch
  [[ -n "$ext_c" ]] || cassandra_launch
  if [[ -n "$ext_k" ]]; then check_external kafka "$ext_k" 30; else kafka_wait; fi
  if [[ -n "$ext_c" ]]; then check_external cassandra "$ext_c" 30; else cassandra_wait; fi
  local k_addr="$KAFKA_ADDR" c_addr="$CASSANDRA_ADDR"
  [[ -z "$ext_k" ]] || k_addr="$(external_addr "$ext_k")"
  [[ -z "$ext_c" ]] || c_addr="$(external_addr "$ext_c")"
  echo "kafka://$k_addr"
  echo "cassandra://$c_addr"
}

status_one() {  # service addr
  local pid
  if pid="$(running_pid "$1")"; then
    if "$PYTHON" "$HERE/wait_ready.py" "$1" "$2" --timeout 5 --pid "$pid" >/dev/null 2>&1; then
      echo "$1: running (pid $pid), ready at $2, rss $(($(ps -o rss= -p "$pid") / 1024)) MiB"
    else
      echo "$1: running (pid $pid), NOT answering at $2 (starting?), log: $(log_of "$1")"; return 3
    fi
  else
    echo "$1: stopped (log: $(log_of "$1"))"; return 3
  fi
}

cmd_status() {
  local rc=0
  check_python
  if [[ -n "${STREAMTASKS_BROKER:-}" ]]; then
    "$PYTHON" "$HERE/wait_ready.py" kafka "$(external_addr "$STREAMTASKS_BROKER")" --timeout 5 >/dev/null 2>&1 &&
      echo "kafka: external $STREAMTASKS_BROKER, ready" || { echo "kafka: external $STREAMTASKS_BROKER, NOT answering"; rc=3; }
  else status_one kafka "$KAFKA_ADDR" || rc=3; fi
  if [[ -n "${STREAMTASKS_BACKEND:-}" ]]; then
    "$PYTHON" "$HERE/wait_ready.py" cassandra "$(external_addr "$STREAMTASKS_BACKEND")" --timeout 5 >/dev/null 2>&1 &&
      echo "cassandra: external $STREAMTASKS_BACKEND, ready" || { echo "cassandra: external $STREAMTASKS_BACKEND, NOT answering"; rc=3; }
  else status_one cassandra "$CASSANDRA_ADDR" || rc=3; fi
  return $rc
}

cmd_down() {
  stop_service kafka "$KAFKA_STOP_TIMEOUT"
  stop_service cassandra "$CASSANDRA_STOP_TIMEOUT"
}

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  clean-data)
    cmd_down
    rm -rf "$DATA"
    say "wiped $DATA"
    ;;
  kafka-start) check_python; kafka_preflight; kafka_launch; kafka_wait; echo "kafka://$KAFKA_ADDR" ;;
  kafka-stop) stop_service kafka "$KAFKA_STOP_TIMEOUT" ;;
  cassandra-start) check_python; cassandra_preflight; cassandra_launch; cassandra_wait; echo "cassandra://$CASSANDRA_ADDR" ;;
  cassandra-stop) stop_service cassandra "$CASSANDRA_STOP_TIMEOUT" ;;
  *) usage ;;
esac
