// Machinery v2 + Redis side of `make bench` (see bench/README.md).
//
//	machinery-bench worker -redis 127.0.0.1:P -concurrency 8
//	machinery-bench bench  -redis 127.0.0.1:P -n 20000 -roundtrips 200
//
// bench prints one JSON object: burst end to end (first send -> last result stored in
// the Redis backend, checked for every task), enqueue rate of that burst, and the
// round trips of one task at a time (SendTask + AsyncResult.Get polling every 1 ms).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/RichardKnop/machinery/v2"
	redisbackend "github.com/RichardKnop/machinery/v2/backends/redis"
	redisbroker "github.com/RichardKnop/machinery/v2/brokers/redis"
	"github.com/RichardKnop/machinery/v2/config"
	eagerlock "github.com/RichardKnop/machinery/v2/locks/eager"
	mlog "github.com/RichardKnop/machinery/v2/log"
	"github.com/RichardKnop/machinery/v2/tasks"
	"github.com/redis/go-redis/v9"
)

// quiet drops the per-task INFO/DEBUG lines (our worker runs at log level warning).
type quiet struct{}

func (quiet) Print(...interface{})          {}
func (quiet) Printf(string, ...interface{}) {}
func (quiet) Println(...interface{})        {}
func (quiet) Fatal(...interface{})          {}
func (quiet) Fatalf(string, ...interface{}) {}
func (quiet) Fatalln(...interface{})        {}
func (quiet) Panic(...interface{})          {}
func (quiet) Panicf(string, ...interface{}) {}
func (quiet) Panicln(...interface{})        {}

func noop() error { return nil }

func server(addr string) (*machinery.Server, error) {
	cnf := &config.Config{
		DefaultQueue:    "machinery_bench",
		ResultsExpireIn: 3600,
		Redis: &config.RedisConfig{
			MaxIdle: 16, IdleTimeout: 240, ReadTimeout: 15, WriteTimeout: 15,
			ConnectTimeout: 15, NormalTasksPollPeriod: 1000, DelayedTasksPollPeriod: 500,
		},
	}
	srv := machinery.NewServer(cnf, redisbroker.NewGR(cnf, []string{addr}, 0),
		redisbackend.NewGR(cnf, []string{addr}, 0), eagerlock.New())
	return srv, srv.RegisterTasks(map[string]interface{}{"noop": noop})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: machinery-bench worker|bench [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	addr := fs.String("redis", "127.0.0.1:6379", "redis host:port (broker and backend)")
	concurrency := fs.Int("concurrency", 8, "worker concurrency")
	n := fs.Int("n", 20000, "tasks in the burst")
	roundtrips := fs.Int("roundtrips", 200, "sequential SendTask + Get round trips")
	_ = fs.Parse(os.Args[2:])
	mlog.SetDebug(quiet{})
	mlog.SetInfo(quiet{})
	srv, err := server(*addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	switch os.Args[1] {
	case "worker":
		w := srv.NewWorker("machinery_bench", *concurrency)
		errs := make(chan error, 1)
		w.LaunchAsync(errs) // machinery handles SIGTERM itself: waits for running tasks
		if err := <-errs; err != nil && err != machinery.ErrWorkerQuitGracefully {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "bench":
		if err := bench(srv, *addr, *n, *roundtrips); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: machinery-bench worker|bench [flags]")
		os.Exit(2)
	}
}

func send(srv *machinery.Server) (string, error) {
	r, err := srv.SendTask(&tasks.Signature{Name: "noop"})
	if err != nil {
		return "", err
	}
	return r.Signature.UUID, nil
}

func bench(srv *machinery.Server, addr string, n, roundtrips int) error {
	// warm: one task through the worker (waits up to 60 s for it to come up)
	r, err := srv.SendTask(&tasks.Signature{Name: "noop"})
	if err != nil {
		return err
	}
	if _, err := r.GetWithTimeout(60*time.Second, time.Millisecond); err != nil {
		return fmt.Errorf("warm-up task: %w", err)
	}
	lat := make([]float64, 0, roundtrips)
	for i := 0; i < roundtrips; i++ {
		t0 := time.Now()
		r, err := srv.SendTask(&tasks.Signature{Name: "noop"})
		if err != nil {
			return err
		}
		if _, err := r.GetWithTimeout(10*time.Second, time.Millisecond); err != nil {
			return err
		}
		lat = append(lat, float64(time.Since(t0).Microseconds())/1000)
	}
	sort.Float64s(lat)

	ids := make([]string, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		if ids[i], err = send(srv); err != nil {
			return err
		}
	}
	sent := time.Since(start)
	rc := redis.NewClient(&redis.Options{Addr: addr})
	defer rc.Close()
	ctx := context.Background()
	success := []byte(`"State":"SUCCESS"`)
	for next := 0; next < n; {
		end := next + 500
		if end > n {
			end = n
		}
		vals, err := rc.MGet(ctx, ids[next:end]...).Result()
		if err != nil {
			return err
		}
		want, advanced := end-next, 0
		for _, v := range vals {
			s, ok := v.(string)
			if !ok || !bytes.Contains([]byte(s), success) {
				break
			}
			advanced++
		}
		next += advanced
		if advanced < want {
			time.Sleep(2 * time.Millisecond)
		}
		if time.Since(start) > 600*time.Second {
			return fmt.Errorf("%d of %d results stored after 600 s", next, n)
		}
	}
	total := time.Since(start)
	return json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"tasks": n, "end_to_end_per_s": float64(n) / total.Seconds(),
		"enqueue_per_s": float64(n) / sent.Seconds(), "seconds": total.Seconds(),
		"roundtrip_p50_ms": pct(lat, 50), "roundtrip_p99_ms": pct(lat, 99),
	})
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}
