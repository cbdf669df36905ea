<?php
// Drives Pheanstalk (Debian php-pda-pheanstalk) through the operations named on the command
// line, each on a fresh connection, and prints one JSON line per operation (see libdrivers.py):
//   php pheanstalk_driver.php PORT OP[:ARG]...
declare(strict_types=1);
require_once '/usr/share/php/Pheanstalk/autoload.php';

use Pheanstalk\JobId;
use Pheanstalk\Pheanstalk;

function short($v): string {
    if ($v === null) return 'null';
    if (is_bool($v)) return $v ? 'true' : 'false';
    if (is_int($v) || is_string($v)) return var_export($v, true);
    if ($v instanceof \Pheanstalk\Job) return 'Job(id=' . $v->getId() . ')';
    if ($v instanceof Pheanstalk) return 'Pheanstalk';
    if ($v instanceof ArrayAccess && $v instanceof Traversable) {
        return get_class($v) . '(' . substr(json_encode(iterator_to_array($v)), 0, 40) . ')';
    }
    return is_object($v) ? get_class($v) : gettype($v);
}

class NotAvailable extends Exception {}

function op(Pheanstalk $p, string $name, ?string $arg) {
    $tube = $arg ?? 'jobs';
    $job = new JobId(($arg !== null && ctype_digit($arg)) ? (int)$arg : 1);
    if ($arg !== null && in_array($name, ['put', 'kick', 'peek-ready', 'peek-buried', 'peek-delayed'], true)) {
        $p->useTube($arg);
    }
    if ($arg !== null && in_array($name, ['reserve', 'reserve-with-timeout'], true)) {
        $p->watch($arg);
        $p->ignore('default');
    }
    switch ($name) {
        case 'use': return $p->useTube($tube);
        case 'watch': return $p->watch($tube);
        case 'ignore': return $p->ignore($arg ?? 'default');
        case 'put': return $p->put('x');
        case 'reserve': return $p->reserve();
        case 'reserve-with-timeout': return $p->reserveWithTimeout(0);
        case 'delete': return $p->delete($job);
        case 'release': return $p->release($job);
        case 'bury': return $p->bury($job);
        case 'touch': return $p->touch($job);
        case 'kick': return $p->kick(1);
        case 'kick-job': return $p->kickJob($job);
        case 'peek': return $p->peek($job);
        case 'peek-ready': return $p->peekReady();
        case 'peek-buried': return $p->peekBuried();
        case 'stats-job': return $p->statsJob($job);
        case 'stats-tube': return $p->statsTube($tube);
        case 'pause-tube': return $p->pauseTube($tube, 0);
        case 'peek-delayed': return $p->peekDelayed();
        case 'list-tubes': return $p->listTubes();
        case 'reserve-job': throw new NotAvailable($name);
    }
    throw new LogicException("unknown op $name");
}

$port = (int)$argv[1];
foreach (array_slice($argv, 2) as $token) {
    $parts = explode(':', $token, 2);
    $name = $parts[0];
    $arg = $parts[1] ?? null;
    $p = Pheanstalk::create('127.0.0.1', $port);
    try {
        $value = op($p, $name, $arg);
        $outcome = 'returned';
        $detail = short($value);
    } catch (NotAvailable $e) {
        echo json_encode(['op' => $token, 'outcome' => 'n/a', 'detail' => 'no such call', 'sync' => '']), "\n";
        continue;
    } catch (\Pheanstalk\Exception $e) {
        $outcome = 'raised';
        $detail = (new ReflectionClass($e))->getShortName() . ': ' . substr($e->getMessage(), 0, 50);
    } catch (Throwable $e) {
        $outcome = 'crashed';
        $detail = get_class($e) . ': ' . substr($e->getMessage(), 0, 50);
    }
    try {
        $s = $p->stats();
        $sync = 'stats pid=' . $s['pid'] . ' uptime=' . $s['uptime'];
    } catch (Throwable $e) {
        $sync = 'stats failed: ' . get_class($e) . ': ' . substr($e->getMessage(), 0, 40);
    }
    echo json_encode(['op' => $token, 'outcome' => $outcome, 'detail' => $detail, 'sync' => $sync]), "\n";
    flush();
    unset($p);  // drops the socket
}
