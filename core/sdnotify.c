/*
 * sdnotify.c - telling systemd what the node is doing (Type=notify).
 *
 * Through libsystemd's sd_notify(): READY=1 once the listener is up,
 * RELOADING=1 ... READY=1 around a SIGHUP reload with STATUS= carrying its
 * result, STOPPING=1 when a graceful stop begins, and WATCHDOG=1 from a loop
 * timer at half of WATCHDOG_USEC, so a loop that stops turning stops the
 * pings and systemd restarts the service.  Without NOTIFY_SOCKET every call
 * is a no-op (sd_notify returns 0), so chatd runs the same outside systemd.
 *
 * The watchdog timer is unreferenced (it never keeps the loop alive) and is
 * closed at STOPPING=1: systemd stops watching a unit that is deactivating.
 */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "core.h"

static uv_timer_t watchdog;
static int watchdog_on;

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    sd_notify(0, "WATCHDOG=1");
}

static void status(const char *state, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    /* STATUS= ends at the newline: keep the text on one line */
    for (char *p = msg; *p; p++)
        if (*p == '\n')
            *p = ' ';
    sd_notifyf(0, "%sSTATUS=%s", state, msg);
}

void sdn_ready(uv_loop_t *loop, const char *fmt, ...)
{
    uint64_t usec = 0;
    va_list ap;
    va_start(ap, fmt);
    status("READY=1\n", fmt, ap);
    va_end(ap);
    if (!loop || watchdog_on || sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
        return;
    uv_timer_init(loop, &watchdog);
    uv_unref((uv_handle_t *)&watchdog);
    /* at half the interval, as sd_watchdog_enabled(3) advises; at least 1 ms */
    uv_timer_start(&watchdog, on_watchdog, 0, usec / 2000 ? usec / 2000 : 1);
    watchdog_on = 1;
    LOGI("systemd watchdog: pinging every %llu ms",
         (unsigned long long)(usec / 2000 ? usec / 2000 : 1));
}

void sdn_reloading(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* MONOTONIC_USEC: what Type=notify-reload (systemd 253+) asks for */
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading",
               (unsigned long long)ts.tv_sec * 1000000ull +
                   (unsigned long long)ts.tv_nsec / 1000ull);
}

void sdn_reloaded(const char *result)
{
    sd_notifyf(0, "READY=1\nSTATUS=%s", result);
}

void sdn_reload_result(int ok, const char *msg, size_t nplugins)
{
    char status[700];
    if (ok) {
        snprintf(status, sizeof status, "reloaded: %zu plugins", nplugins);
        LOGI("%s", status); /* failures were logged as they happened */
    } else
        snprintf(status, sizeof status, "reload failed: %s", msg);
    sdn_reloaded(status);
}

void sdn_stopping(void)
{
    sd_notify(0, "STOPPING=1\nSTATUS=stopping");
    if (watchdog_on) {
        uv_close((uv_handle_t *)&watchdog, NULL);
        watchdog_on = 0;
    }
}

void sdn_status(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    status("", fmt, ap);
    va_end(ap);
}
