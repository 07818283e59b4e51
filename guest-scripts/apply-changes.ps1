# rdphealth-script: apply-changes v2
# The one script that changes anything inside a guest. The operator declares each in-guest
# repair as a list of typed changes (src/guest/changes.rs) and replaces the `$Plan = ...` line
# below with them; the rest of this file runs verbatim.
#
# Per change, in order: read and report the previous value, create a registry key only when
# it is missing (parent first, never `New-Item -Force`, which on the registry provider deletes
# an existing key with all its values and subkeys), write, read back and compare. The first
# error stops the script: it prints which change failed and exits with 1. Nothing else is
# touched. Output contract (one line each, Run Command keeps the last 4 KiB):
#   RDPHEALTH begin repair=NAME changes=N
#   RDPHEALTH change n=I op=set key="..." name=NAME type=DWord|String had=0|1 old="..." new="..." created=0|1
#   RDPHEALTH change n=I op=remove key="..." name=NAME had=0|1 old="..." new=""
#   RDPHEALTH change n=I op=restart service=NAME old=STATUS new=STATUS
#   RDPHEALTH change n=I op=acl path="..." backup="..." old="saved to backup" new="..."
#   RDPHEALTH change n=I op=removecert thumbprint=T notAfter=ISO8601
#   RDPHEALTH skipped n=I op=removecert reason="..."
#   RDPHEALTH change n=I op=unbindcert key="..." name=SSLCertificateSHA1Hash had=1 old="T" new=""
#   RDPHEALTH skipped n=I op=unbindcert reason="..."
#   RDPHEALTH change n=I op=firewallport rule=NAME old="PORT" new="PORT"
#   RDPHEALTH failed n=I op=OP target="..." detail="..."
#   RDPHEALTH result status=ok|failed changes=N change=I restart=required|none
$ErrorActionPreference = 'Stop'
$Plan = @{ Repair = 'none'; Restart = 'none'; Changes = @() }

function Get-Reg($Path, $Name) {
    # The value as stored, without expanding environment names; Present is false when absent.
    if (-not (Test-Path -LiteralPath $Path)) {
        return [pscustomobject]@{ Present = $false; Value = $null; Kind = '' }
    }
    $key = Get-Item -LiteralPath $Path
    if ($key.GetValueNames() -notcontains $Name) {
        return [pscustomobject]@{ Present = $false; Value = $null; Kind = '' }
    }
    $value = $key.GetValue($Name, $null, [Microsoft.Win32.RegistryValueOptions]::DoNotExpandEnvironmentNames)
    return [pscustomobject]@{ Present = $true; Value = $value; Kind = [string]$key.GetValueKind($Name) }
}

function Format-Reg($Value) {
    # DWORDs come back as signed Int32; report them unsigned, as regedit shows them.
    if ($null -eq $Value) { return '' }
    if ($Value -is [byte[]]) { return ([BitConverter]::ToString($Value)).Replace('-', '') }
    if ($Value -is [int]) { return [string][BitConverter]::ToUInt32([BitConverter]::GetBytes([int32]$Value), 0) }
    return ([string]$Value).Replace('"', "'")
}

function New-KeyPath($Path) {
    # Creates each missing key of $Path, parent first. An existing key is never touched.
    $created = $false
    $parts = $Path.Split('\')
    $current = $parts[0]
    foreach ($part in $parts[1..($parts.Count - 1)]) {
        $next = "$current\$part"
        if (-not (Test-Path -LiteralPath $next)) {
            New-Item -Path "$current\" -Name $part | Out-Null
            $created = $true
        }
        $current = $next
    }
    return $created
}

function Invoke-Native($File, [string[]]$Arguments) {
    # Native programs report failure through their exit code only: check it.
    $ErrorActionPreference = 'Continue'
    & $File @Arguments | Out-Null
    $code = $LASTEXITCODE
    $ErrorActionPreference = 'Stop'
    if ($code -ne 0) { throw "$File $($Arguments -join ' ') exited with $code" }
}

function Set-Reg($n, $c) {
    $created = New-KeyPath $c.Key
    $before = Get-Reg $c.Key $c.Name
    if ($c.Type -eq 'DWord') {
        $value = [BitConverter]::ToInt32([BitConverter]::GetBytes([uint32]$c.Value), 0)
    } elseif ($c.Type -eq 'Binary') {
        $value = [byte[]]@(for ($i = 0; $i -lt $c.Value.Length; $i += 2) { [Convert]::ToByte($c.Value.Substring($i, 2), 16) })
    } else {
        $value = [string]$c.Value
    }
    Set-ItemProperty -LiteralPath $c.Key -Name $c.Name -Value $value -Type $c.Type
    $after = Get-Reg $c.Key $c.Name
    if (-not $after.Present -or $after.Kind -ne $c.Type -or (Format-Reg $after.Value) -ne (Format-Reg $value)) {
        throw "read back $($after.Kind) '$(Format-Reg $after.Value)', expected $($c.Type) '$(Format-Reg $value)'"
    }
    "RDPHEALTH change n=$n op=set key=`"$($c.Key)`" name=$($c.Name) type=$($c.Type) had=$([int]$before.Present) old=`"$(Format-Reg $before.Value)`" new=`"$(Format-Reg $after.Value)`" created=$([int]$created)"
}

function Remove-Reg($n, $c) {
    $before = Get-Reg $c.Key $c.Name
    if ($before.Present) { Remove-ItemProperty -LiteralPath $c.Key -Name $c.Name }
    $after = Get-Reg $c.Key $c.Name
    if ($after.Present) { throw 'the value is still present after removing it' }
    "RDPHEALTH change n=$n op=remove key=`"$($c.Key)`" name=$($c.Name) had=$([int]$before.Present) old=`"$(Format-Reg $before.Value)`" new=`"`""
}

function Restart-Svc($n, $c) {
    $before = (Get-Service -Name $c.Service).Status
    Restart-Service -Name $c.Service -Force
    $svc = Get-Service -Name $c.Service
    $svc.WaitForStatus('Running', [TimeSpan]::FromSeconds(60))
    $svc.Refresh()
    "RDPHEALTH change n=$n op=restart service=$($c.Service) old=$before new=$($svc.Status)"
}

function Reset-Acl($n, $c) {
    # The guide's MachineKeys reset, with a backup of the previous ACLs first.
    $backup = Join-Path $env:SystemRoot ('Temp\rdphealth-acl-{0:yyyyMMddHHmmss}.txt' -f (Get-Date))
    Invoke-Native 'icacls.exe' @($c.Path, '/save', $backup, '/t', '/c')
    Invoke-Native 'takeown.exe' @('/f', $c.Path, '/a', '/r', '/d', 'y')
    foreach ($grant in $c.Grants.Split(',')) {
        Invoke-Native 'icacls.exe' @($c.Path, '/t', '/c', '/grant', $grant)
    }
    "RDPHEALTH change n=$n op=acl path=`"$($c.Path)`" backup=`"$backup`" old=`"saved to backup`" new=`"$($c.Grants)`""
}

function Remove-RdpCertificate($n, $c) {
    # Only the self-signed certificate Windows renews by itself; a bound custom one is kept.
    $bound = Get-Reg $c.Key 'SSLCertificateSHA1Hash'
    if ($bound.Present) {
        "RDPHEALTH skipped n=$n op=removecert reason=`"SSLCertificateSHA1Hash binds a custom certificate`""
        return
    }
    foreach ($cert in @(Get-ChildItem -LiteralPath $c.Store)) {
        Remove-Item -LiteralPath $cert.PSPath
        "RDPHEALTH change n=$n op=removecert thumbprint=$($cert.Thumbprint) notAfter=$($cert.NotAfter.ToString('o'))"
    }
    if (@(Get-ChildItem -LiteralPath $c.Store).Count -ne 0) { throw 'a certificate is still in the store' }
}

function Remove-StaleBinding($n, $c) {
    # Only a binding to a certificate that is in neither store: a bound certificate that
    # exists is the owner's choice and is kept.
    $bound = Get-Reg $c.Key 'SSLCertificateSHA1Hash'
    if (-not $bound.Present) {
        "RDPHEALTH skipped n=$n op=unbindcert reason=`"no SSLCertificateSHA1Hash`""
        return
    }
    $thumbprint = Format-Reg $bound.Value
    $found = @(Get-ChildItem -LiteralPath 'Cert:\LocalMachine\My', 'Cert:\LocalMachine\Remote Desktop' | Where-Object { $_.Thumbprint -eq $thumbprint })
    if ($found.Count -ne 0) {
        "RDPHEALTH skipped n=$n op=unbindcert reason=`"the bound certificate $thumbprint is in the store`""
        return
    }
    Remove-ItemProperty -LiteralPath $c.Key -Name 'SSLCertificateSHA1Hash'
    if ((Get-Reg $c.Key 'SSLCertificateSHA1Hash').Present) { throw 'SSLCertificateSHA1Hash is still present after removing it' }
    "RDPHEALTH change n=$n op=unbindcert key=`"$($c.Key)`" name=SSLCertificateSHA1Hash had=1 old=`"$thumbprint`" new=`"`""
}

function Set-FirewallPort($n, $c) {
    # The rule must exist (Get-NetFirewallRule throws otherwise); only its local port changes.
    $before = (Get-NetFirewallRule -Name $c.Rule | Get-NetFirewallPortFilter).LocalPort
    Set-NetFirewallRule -Name $c.Rule -LocalPort $c.Port
    $after = (Get-NetFirewallRule -Name $c.Rule | Get-NetFirewallPortFilter).LocalPort
    if ([string]$after -ne [string]$c.Port) { throw "read back LocalPort '$after', expected '$($c.Port)'" }
    "RDPHEALTH change n=$n op=firewallport rule=$($c.Rule) old=`"$before`" new=`"$after`""
}

$n = 0
"RDPHEALTH begin repair=$($Plan.Repair) changes=$($Plan.Changes.Count)"
foreach ($c in $Plan.Changes) {
    $n++
    try {
        switch ($c.Op) {
            'set' { Set-Reg $n $c }
            'remove' { Remove-Reg $n $c }
            'restart' { Restart-Svc $n $c }
            'acl' { Reset-Acl $n $c }
            'removecert' { Remove-RdpCertificate $n $c }
            'unbindcert' { Remove-StaleBinding $n $c }
            'firewallport' { Set-FirewallPort $n $c }
            default { throw "unknown change '$($c.Op)'" }
        }
    } catch {
        $target = "$($c.Key)$($c.Service)$($c.Path)$($c.Store)$($c.Rule)"
        if ($c.Name) { $target = "$target\$($c.Name)" }
        "RDPHEALTH failed n=$n op=$($c.Op) target=`"$target`" detail=`"$($_.Exception.Message.Replace('"', "'"))`""
        "RDPHEALTH result status=failed change=$n restart=none"
        exit 1
    }
}
"RDPHEALTH result status=ok changes=$n restart=$($Plan.Restart)"
