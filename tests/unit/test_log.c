/*
 * test_log.c - CUnit tests of core/log.c: the text and JSON forms, escaping,
 * long lines cut without breaking the JSON, the session context, the
 * journal's priority prefix, and reopening log_file in place while other
 * threads log.
 *
 * Each test logs into a file of its own (log_open) and reads it back.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CUnit/Basic.h>

#include "core.h"

static char dir[] = "/tmp/chatd-test-log-XXXXXX";
static char path[256];

static char *slurp(const char *p)
{
    static char buf[1 << 20];
    FILE *f = fopen(p, "r");
    size_t n = 0;
    buf[0] = '\0';
    if (f) {
        n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
    }
    buf[n] = '\0';
    return buf;
}

static void fresh(int format)
{
    char err[256];
    static int n;
    snprintf(path, sizeof path, "%s/log%d", dir, n++);
    CU_ASSERT_EQUAL_FATAL(log_open(path, format, err, sizeof err), 0);
}

static void test_parse(void)
{
    CU_ASSERT_EQUAL(log_parse_format("text"), LOG_FORMAT_TEXT);
    CU_ASSERT_EQUAL(log_parse_format("JSON"), LOG_FORMAT_JSON);
    CU_ASSERT_EQUAL(log_parse_format("xml"), -1);
    CU_ASSERT_EQUAL(log_parse_level("warn"), CHAT_LOG_WARN);
}

static void test_text(void)
{
    struct log_ctx c = {7, "10.0.0.1:5", 42, "al\nice"};
    fresh(LOG_FORMAT_TEXT);
    log_write(CHAT_LOG_WARN, "core", "plain %d", 1);
    log_write_ctx(CHAT_LOG_INFO, "login", &c, "about %s", "her");
    c.user = 0;
    log_write_ctx(CHAT_LOG_DEBUG, "core", &c, "not logged in");
    const char *t = slurp(path);
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "Z warn  [core] plain 1\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "Z info  [login] session=7 peer=10.0.0.1:5 "
                                     "user=42 name=al?ice about her\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "Z debug [core] session=7 peer=10.0.0.1:5 "
                                     "not logged in\n"));
}

static void test_json(void)
{
    struct log_ctx c = {7, "[::1]:5", 42, "q\"b\\\x01"};
    fresh(LOG_FORMAT_JSON);
    log_write_ctx(CHAT_LOG_ERROR, "core", &c, "tab\there \"quoted\"");
    const char *t = slurp(path);
    CU_ASSERT_EQUAL(strncmp(t, "{\"ts\":\"", 7), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "Z\",\"level\":\"error\",\"who\":\"core\","
                                     "\"session\":7,\"peer\":\"[::1]:5\",\"user\":42,"
                                     "\"name\":\"q\\\"b\\\\\\u0001\","
                                     "\"msg\":\"tab\\there \\\"quoted\\\"\"}\n"));
}

/* JSON lines are valid UTF-8: a character cut in half or a stray byte
 * becomes U+FFFD; whole characters pass as they are. */
static void test_json_utf8(void)
{
    fresh(LOG_FORMAT_JSON);
    log_write(CHAT_LOG_INFO, "core", "ok \xc3\xa9\xe2\x82\xac|bad \xff\xc3|cut \xe2\x82");
    const char *t = slurp(path);
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "\"msg\":\"ok \xc3\xa9\xe2\x82\xac|bad \\ufffd"
                                     "\\ufffd|cut \\ufffd\\ufffd\"}\n"));
}

/* A message far over the line size: cut, and still one closed object. */
static void test_json_long(void)
{
    char big[4000];
    fresh(LOG_FORMAT_JSON);
    for (size_t i = 0; i < sizeof big - 1; i++)
        big[i] = i % 3 ? '"' : 'x'; /* every cut lands near an escape */
    big[sizeof big - 1] = '\0';
    log_write(CHAT_LOG_INFO, "core", "%s", big);
    const char *t = slurp(path);
    size_t n = strlen(t);
    CU_ASSERT(n > 1000 && n <= 2048);
    CU_ASSERT_EQUAL(strchr(t, '\n') - t, (long)n - 1);
    CU_ASSERT(n >= 3 && strcmp(t + n - 3, "\"}\n") == 0);
    /* no dangling backslash before the closing quote */
    CU_ASSERT(t[n - 4] != '\\' || t[n - 5] == '\\');
}

static void test_journal(void)
{
    char env[64];
    struct stat st;
    char err[256];
    /* stderr pointed at a file whose dev:ino JOURNAL_STREAM names */
    snprintf(path, sizeof path, "%s/journal", dir);
    int saved = dup(STDERR_FILENO);
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    dup2(fileno(f), STDERR_FILENO);
    fstat(STDERR_FILENO, &st);
    snprintf(env, sizeof env, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    setenv("JOURNAL_STREAM", env, 1);
    CU_ASSERT_EQUAL(log_open("", LOG_FORMAT_TEXT, err, sizeof err), 0);
    log_write(CHAT_LOG_ERROR, "core", "e");
    log_write(CHAT_LOG_WARN, "core", "w");
    log_write(CHAT_LOG_INFO, "core", "i");
    log_write(CHAT_LOG_DEBUG, "x", "d");
    setenv("JOURNAL_STREAM", "1:1", 1);
    CU_ASSERT_EQUAL(log_open("", LOG_FORMAT_TEXT, err, sizeof err), 0);
    log_write(CHAT_LOG_INFO, "core", "stamped");
    unsetenv("JOURNAL_STREAM");
    dup2(saved, STDERR_FILENO);
    close(saved);
    fclose(f);
    const char *t = slurp(path);
    CU_ASSERT_EQUAL(strncmp(t, "<3>error [core] e\n<4>warn  [core] w\n"
                               "<6>info  [core] i\n<7>debug [x] d\n", 68), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "Z info  [core] stamped\n"));
}

#define PER_THREAD 2000
static atomic_int written;

static void *logger(void *arg)
{
    (void)arg;
    for (int i = 0; i < PER_THREAD; i++) {
        log_write(CHAT_LOG_INFO, "core", "from a thread %s", "......................");
        atomic_fetch_add(&written, 1);
    }
    return NULL;
}

/* log_reopen while threads log: every line lands whole in one file or the
 * other; nothing goes to a closed descriptor, nothing is lost. */
static void test_reopen_under_threads(void)
{
    pthread_t th[3];
    char rotated[300];
    fresh(LOG_FORMAT_TEXT);
    log_level = CHAT_LOG_INFO;
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, logger, NULL);
    while (atomic_load(&written) < PER_THREAD)
        usleep(100);
    snprintf(rotated, sizeof rotated, "%s.1", path);
    CU_ASSERT_EQUAL(rename(path, rotated), 0);
    CU_ASSERT_EQUAL(log_reopen(), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    int total = 0;
    const char *names[] = {rotated, path};
    for (int k = 0; k < 2; k++) {
        const char *t = slurp(names[k]), *line = t;
        int lines = 0, bad = 0;
        while (*line) {
            const char *nl = strchr(line, '\n');
            char one[256];
            size_t len = nl ? (size_t)(nl - line) : strlen(line);
            if (!nl || len >= sizeof one) {
                bad++;
                break;
            }
            memcpy(one, line, len);
            one[len] = '\0';
            if (!strstr(one, "SIGUSR1: reopened")) {
                const char *m = strstr(one, "from a thread ");
                if (!m || strcmp(m, "from a thread ......................") != 0)
                    bad++;
            }
            lines++;
            line = nl + 1;
        }
        CU_ASSERT(lines > 0);
        CU_ASSERT_EQUAL(bad, 0);
        total += lines;
    }
    CU_ASSERT_EQUAL(total, 3 * PER_THREAD + 1); /* and the "reopened" line */
    CU_ASSERT_PTR_NOT_NULL(strstr(slurp(path), "SIGUSR1: reopened"));
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    if (!mkdtemp(dir))
        return 2;
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("log", NULL, NULL);
    CU_add_test(s, "format and level names", test_parse);
    CU_add_test(s, "text lines, session context", test_text);
    CU_add_test(s, "JSON lines, escaping", test_json);
    CU_add_test(s, "a long JSON line is cut and closed", test_json_long);
    CU_add_test(s, "JSON lines are valid UTF-8", test_json_utf8);
    CU_add_test(s, "journal: priorities, no timestamps", test_journal);
    CU_add_test(s, "reopen while threads log", test_reopen_under_threads);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0)
            failed++;
    }
    return failed ? 1 : 0;
}
